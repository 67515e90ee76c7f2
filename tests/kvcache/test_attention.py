"""The decode-attention seam against a float64 NumPy reference: outputs, log-sum-exp and the
probabilities it returns (which sum to one over the allowed slots), on slots whose order is not
position order; the blocked (online-softmax) path equals the one-block path."""

import numpy as np
import pytest

import kvcache.attention as ka
from kvcache.attention import (
  get_decode_attention,
  reference_decode_attention,
  slot_attention,
)


def _inputs(seed, b=2, k=3, g=4, t=5, n=37, e=8):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, k, g, t, e)).astype(np.float32)
  kk = rng.standard_normal((b, k, n, e)).astype(np.float32)
  v = rng.standard_normal((b, k, n, e)).astype(np.float32)
  pos = np.stack([np.stack([rng.permutation(n) for _ in range(k)]) for _ in range(b)])
  pos = np.where(rng.random(pos.shape) < 0.2, -1, pos).astype(np.int32)  # empty slots
  pos[0, 0] = -1  # a head with nothing stored
  q_pos = np.sort(rng.integers(0, n, (b, t)), axis=1).astype(np.int32)
  mask = rng.random((b, k, g, t, n)) < 0.7
  return q, kk, v, pos, q_pos, mask


def _numpy_attention(q, k, v, pos, q_pos, mask):
  """Loops over every (b, kv head, g, t) in float64."""
  b, kh, g, t, e = q.shape
  out = np.zeros(q.shape)
  lse = np.full((b, kh, g, t), -np.inf)
  probs = np.zeros((b, kh, g, t, k.shape[2]))
  for i in np.ndindex(b, kh, g, t):
    bi, hi, gi, ti = i
    ok = (pos[bi, hi] >= 0) & (pos[bi, hi] <= q_pos[bi, ti])
    if mask is not None:
      ok &= mask[i]
    if not ok.any():
      continue
    s = k[bi, hi].astype(np.float64) @ q[i].astype(np.float64) / np.sqrt(e)
    s = np.where(ok, s, -np.inf)
    m = s.max()
    w = np.exp(s - m)
    lse[i] = m + np.log(w.sum())
    probs[i] = w / w.sum()
    out[i] = probs[i] @ v[bi, hi]
  return out, lse, probs


@pytest.mark.parametrize("use_mask", [False, True])
def test_slot_attention_and_probabilities_against_numpy(use_mask):
  seed = 3 + use_mask
  print(f"seed={seed}")
  q, k, v, pos, q_pos, mask = _inputs(seed)
  mask = mask if use_mask else None
  out, lse, probs = slot_attention(q, k, v, pos, q_pos, mask, return_probs=True)
  want_out, want_lse, want_p = _numpy_attention(q, k, v, pos, q_pos, mask)
  np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5)
  np.testing.assert_allclose(np.asarray(probs), want_p, atol=2e-6)
  has = np.isfinite(want_lse)
  assert (~has).any() and has.any()  # rows with nothing allowed are exercised too
  np.testing.assert_allclose(np.asarray(probs).sum(-1)[has], 1.0, atol=1e-5)
  assert np.all(np.asarray(probs).sum(-1)[~has] == 0) and np.all(np.asarray(out)[~has] == 0)


def test_blocked_path_equals_one_block(monkeypatch):
  seed = 5
  print(f"seed={seed}")
  q, k, v, pos, q_pos, mask = _inputs(seed, n=64)
  one = slot_attention(q, k, v, pos, q_pos, mask)
  monkeypatch.setattr(ka, "_BLOCK_ELEMENTS", 2 * 3 * 4 * 5 * 16)  # blocks of 16 slots
  assert ka._block(64, 2 * 3 * 4 * 5) == 16
  blocked = slot_attention(q, k, v, pos, q_pos, mask)
  np.testing.assert_allclose(np.asarray(blocked[0]), np.asarray(one[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(blocked[1]), np.asarray(one[1]), atol=1e-5)


def test_decode_seam_one_query():
  seed = 6
  print(f"seed={seed}")
  q, k, v, pos, q_pos, mask = _inputs(seed, t=1)
  out, lse, probs = reference_decode_attention(q[:, :, :, 0], k, v, pos, q_pos[:, 0],
                                               mask[:, :, :, 0], return_probs=True)
  want_out, want_lse, want_p = _numpy_attention(q, k, v, pos, q_pos, mask)
  np.testing.assert_allclose(np.asarray(out), want_out[:, :, :, 0], atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse[..., 0], atol=2e-5)
  np.testing.assert_allclose(np.asarray(probs), want_p[:, :, :, 0], atol=2e-6)
  auto_out, auto_lse, none = get_decode_attention("auto")(q[:, :, :, 0], k, v, pos, q_pos[:, 0],
                                                          mask[:, :, :, 0])
  assert none is None
  np.testing.assert_allclose(np.asarray(auto_out), want_out[:, :, :, 0], atol=2e-5)


def test_seam_errors():
  with pytest.raises(ValueError, match="unknown decode attention 'nope'"):
    get_decode_attention("nope")
  q, k, v, pos, q_pos, _ = _inputs(0, t=1, n=32)
  with pytest.raises(ValueError, match="not probabilities"):
    get_decode_attention("pallas")(q[:, :, :, 0], k, v, pos, q_pos[:, 0], return_probs=True)


