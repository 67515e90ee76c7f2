"""KV-cache decode attention (interpret mode on CPU) against an independent float64 numpy loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    cache_decode_attention,
    cache_decode_attention_reference,
    paged_decode_attention,
    paged_decode_attention_parts,
    pick_block_size,
    supports,
)
from pallas_kernels.merge import merge_partials


def _inputs(rng, B, K, G, N, E, dtype, with_mask, nan_empty=False):
  """Random cache: positions drawn without replacement from [0, 2N) in random slot order, ~20%
  of slots empty (-1), queries at positions that leave some slots in the future; sequence B-1 has
  one KV head with no token at all, and with a mask head (0, 0, 0) may attend nothing."""
  q = rng.standard_normal((B, K, G, E)).astype(np.float32)
  k = rng.standard_normal((B, K, N, E)).astype(np.float32)
  v = rng.standard_normal((B, K, N, E)).astype(np.float32)
  pos = np.stack([np.stack([rng.choice(2 * N, N, replace=False) for _ in range(K)])
                  for _ in range(B)]).astype(np.int32)
  pos[rng.random(pos.shape) < 0.2] = -1
  pos[B - 1, K - 1] = -1
  q_pos = rng.integers(N // 2, 2 * N, B).astype(np.int32)
  mask = None
  if with_mask:
    mask = rng.random((B, K, G, N)) < 0.5
    mask[0, 0, 0] = False
  if nan_empty:  # empty slots may hold anything: the kernel must not read them
    k[pos < 0] = np.nan
    v[pos < 0] = np.nan
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return q, k, v, jnp.asarray(pos), jnp.asarray(q_pos), None if mask is None else jnp.asarray(mask)


def _numpy_attention(q, k, v, pos, q_pos, mask, sm_scale=None):
  """float64 loop over (b, k, g): softmax over the slots picked by the contract's rule."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  pos, q_pos = np.asarray(pos), np.asarray(q_pos)
  B, K, G, E = q.shape
  scale = 1.0 / np.sqrt(E) if sm_scale is None else sm_scale
  o = np.zeros((B, K, G, E))
  lse = np.full((B, K, G), -np.inf)
  for b in range(B):
    for h in range(K):
      for g in range(G):
        ok = (pos[b, h] >= 0) & (pos[b, h] <= q_pos[b])
        if mask is not None:
          ok &= np.asarray(mask)[b, h, g]
        idx = np.flatnonzero(ok)
        if idx.size == 0:
          continue
        s = k[b, h, idx] @ q[b, h, g] * scale
        m = s.max()
        w = np.exp(s - m)
        lse[b, h, g] = m + np.log(w.sum())
        o[b, h, g] = (w / w.sum()) @ v[b, h, idx]
  return o, lse


def _check(o, lse, want_o, want_lse, dtype, shape):
  o32 = np.asarray(o, np.float32)
  assert o.shape == shape and o.dtype == dtype
  assert lse.shape == shape[:-1] and lse.dtype == jnp.float32
  assert not np.isnan(o32).any() and not np.isnan(np.asarray(lse)).any()
  err = np.linalg.norm(o32 - want_o) / np.linalg.norm(want_o)
  assert err < (1e-5 if dtype == jnp.float32 else 1e-2), err
  empty = np.isinf(want_lse)
  assert (np.isneginf(np.asarray(lse)) == empty).all()
  assert (o32[empty] == 0.0).all()
  assert np.allclose(np.asarray(lse)[~empty], want_lse[~empty], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("G,N,E,dtype,with_mask,num_splits", [
    (1, 128, 32, jnp.float32, False, 1),
    (4, 192, 16, jnp.bfloat16, True, 3),  # 3 blocks of 64 over 3 splits
    (8, 96, 32, jnp.float32, True, 2),  # blocks of 32
    (4, 128, 16, jnp.float32, False, None),  # default splits
    (8, 256, 16, jnp.bfloat16, False, 4),
    (1, 48, 32, jnp.bfloat16, True, 5),  # blocks of 16; splits clipped to the 3 blocks
])
def test_decode_matches_numpy(G, N, E, dtype, with_mask, num_splits, seed, compiled):
  rng = np.random.default_rng(seed)
  B, K = 3, 2
  args = _inputs(rng, B, K, G, N, E, dtype, with_mask, nan_empty=G == 4)
  run = lambda *a: cache_decode_attention(*a, num_splits=num_splits)
  o, lse = compiled(run, *args)
  want_o, want_lse = _numpy_attention(*args)
  assert np.isinf(want_lse[B - 1, K - 1]).all()  # the empty KV head
  _check(o, lse, want_o, want_lse, dtype, (B, K, G, E))


def test_decode_slot_order_and_scale(seed, compiled):
  """Permuting the slots changes nothing; sm_scale is applied to the logits."""
  rng = np.random.default_rng(seed)
  B, K, G, N, E = 2, 2, 4, 64, 16
  q, k, v, pos, q_pos, mask = _inputs(rng, B, K, G, N, E, jnp.float32, True)
  perm = rng.permutation(N)
  run = lambda *a: cache_decode_attention(*a, sm_scale=0.3, num_splits=2)
  o, lse = compiled(run, q, k, v, pos, q_pos, mask)
  po, plse = compiled(run, q, k[:, :, perm], v[:, :, perm], pos[:, :, perm], q_pos,
                       mask[..., perm])
  want_o, want_lse = _numpy_attention(q, k, v, pos, q_pos, mask, sm_scale=0.3)
  _check(o, lse, want_o, want_lse, jnp.float32, (B, K, G, E))
  np.testing.assert_allclose(po, o, atol=1e-5)
  np.testing.assert_allclose(plse, lse, atol=1e-5)


@pytest.mark.parametrize("dtype,with_mask", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_reference_matches_numpy(dtype, with_mask, seed):
  rng = np.random.default_rng(seed)
  args = _inputs(rng, 3, 2, 4, 40, 24, dtype, with_mask, nan_empty=True)  # any N, E
  o, lse = cache_decode_attention_reference(*args)
  _check(o, lse, *_numpy_attention(*args), dtype, (3, 2, 4, 24))


def test_all_invalid_everywhere(seed):
  """A query before every cached token: o = 0 and lse = -inf, no NaN."""
  seed = seed
  rng = np.random.default_rng(seed)
  q, k, v, pos, _, _ = _inputs(rng, 2, 1, 4, 64, 16, jnp.float32, False)
  o, lse = cache_decode_attention(q, k, v, jnp.maximum(pos, 1), jnp.zeros((2,), jnp.int32))
  assert (np.asarray(o) == 0).all() and np.isneginf(np.asarray(lse)).all(), seed


def test_block_size_choice():
  assert [pick_block_size(n) for n in (64, 192, 96, 48, 4096)] == [64, 64, 32, 16, 64]
  assert supports(48) and supports(4096, head_dim=128)
  assert not supports(40) and not supports(0) and not supports(64, head_dim=48)
  with pytest.raises(ValueError, match="N=40"):
    pick_block_size(40)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(2, 2, 4)), "q must be 4-D"),
    (dict(v=(2, 2, 32, 16)), "must agree"),
    (dict(k=(2, 3, 64, 16), v=(2, 3, 64, 16), pos=(2, 3, 64)), "does not match q"),
    (dict(kdtype=jnp.int32), "k must be a float"),
    (dict(pos=(2, 2, 32)), "pos must be"),
    (dict(posdtype=jnp.float32), "pos must be"),
    (dict(q_pos=(2, 1)), "q_pos must be"),
    (dict(qposdtype=jnp.float32), "q_pos must be"),
    (dict(mask=(2, 2, 3, 64)), "mask must be"),
    (dict(mask=(2, 2, 4, 64), maskdtype=jnp.int8), "mask must be"),
    (dict(k=(2, 2, 40, 16), v=(2, 2, 40, 16), pos=(2, 2, 40)), "N=40"),
    (dict(q=(2, 2, 4, 24), k=(2, 2, 64, 24), v=(2, 2, 64, 24)), "head_dim E=24"),
    (dict(block_size=48), "block_size"),
    (dict(block_size=128), "divide"),
    (dict(num_splits=0), "num_splits"),
])
def test_decode_bad_input_raises(kwargs, match):
  get = lambda name, default: kwargs.get(name, default)
  q = jnp.zeros(get("q", (2, 2, 4, 16)))
  k = jnp.zeros(get("k", (2, 2, 64, 16)), get("kdtype", jnp.float32))
  v = jnp.zeros(get("v", k.shape), k.dtype)
  pos = jnp.zeros(get("pos", (2, 2, 64)), get("posdtype", jnp.int32))
  q_pos = jnp.zeros(get("q_pos", (2,)), get("qposdtype", jnp.int32))
  mask = jnp.zeros(kwargs["mask"], get("maskdtype", bool)) if "mask" in kwargs else None
  with pytest.raises(ValueError, match=match):
    cache_decode_attention(q, k, v, pos, q_pos, mask, block_size=get("block_size", None),
                           num_splits=get("num_splits", None))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,with_mask", [(jnp.bfloat16, True), (jnp.bfloat16, False),
                                             (jnp.float32, True)])
def test_decode_compiled_gpu(dtype, with_mask, seed):
  rng = np.random.default_rng(seed)
  B, K, G, N, E = 2, 4, 8, 4096, 128
  args = _inputs(rng, B, K, G, N, E, dtype, with_mask, nan_empty=True)
  o, lse = cache_decode_attention(*args, interpret=False)
  _check(o, lse, *_numpy_attention(*args), dtype, (B, K, G, E))
  ro, rlse = cache_decode_attention_reference(*args)
  assert np.allclose(np.asarray(lse), np.asarray(rlse), atol=1e-3)


@pytest.mark.parametrize("G,S,bs", [(1, 16, 16), (4, 16, 32), (8, 32, 16), (3, 16, 64),
                                    (20, 32, 32), (20, 16, None)])
def test_paged_decode_matches_numpy(G, S, bs, seed, compiled):
  """Pages in a random order of the pool, each sequence its own table; the kernel reads the
  pages through the table (tiles of bs tokens: several pages' gathered rows when bs > S, part of
  a page when bs < S) against a float64 loop over the tokens in logical order."""
  rng = np.random.default_rng(seed)
  B, K, E, P, W = 3, 2, 16, 12, 4
  kp = rng.standard_normal((K, P, S, E)).astype(np.float32)
  vp = rng.standard_normal((K, P, S, E)).astype(np.float32)
  tables = np.stack([rng.permutation(P)[:W] for _ in range(B)]).astype(np.int32)
  q_pos = np.array([0, 37, W * S - 1], np.int32)  # one token, mid-page, every page full
  q = rng.standard_normal((B, K, G, E)).astype(np.float32)
  o, lse = compiled(lambda *a: paged_decode_attention(*a, num_splits=2, block_tokens=bs),
                    q, kp, vp, tables, q_pos)
  for b in range(B):
    n = q_pos[b] + 1
    rows = [tables[b, t // S] for t in range(n)]
    k = np.stack([kp[:, rows[t], t % S] for t in range(n)], axis=1)  # [K, n, E]
    v = np.stack([vp[:, rows[t], t % S] for t in range(n)], axis=1)
    s = np.einsum("kge,kne->kgn", q[b].astype(np.float64), k) / np.sqrt(E)
    m = s.max(-1, keepdims=True)
    w = np.exp(s - m)
    want = np.einsum("kgn,kne->kge", w / w.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(o[b]), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse[b]), (m[..., 0] + np.log(w.sum(-1))), atol=2e-5)


def test_paged_decode_parts_in_one_launch_equal_each_alone(seed, compiled):
  """Two parts of different rows, table widths, tiles and splits (a prefix group's many rows
  over long tables, single sequences over short ones) in one launch: each equals its own launch,
  and its own launch the float64 loop of test_paged_decode_matches_numpy."""
  rng = np.random.default_rng(seed)
  K, S, E, P = 2, 16, 16, 20
  kp, vp = (rng.standard_normal((K, P, S, E)).astype(np.float32) for _ in range(2))
  a = (rng.standard_normal((2, K, 20, E)).astype(np.float32),
       np.stack([rng.permutation(P)[:8] for _ in range(2)]).astype(np.int32),
       np.array([127, 70], np.int32))
  b = (rng.standard_normal((5, K, 3, E)).astype(np.float32),
       np.stack([rng.permutation(P)[:2] for _ in range(5)]).astype(np.int32),
       np.array([0, 15, 16, 31, 20], np.int32))
  (oa, la), (ob, lb) = compiled(  # part a's 20 rows as one tile of 32 (12 masked)
      lambda *x: paged_decode_attention_parts([x[:3], x[3:]], kp, vp, num_splits=[3, 1],
                                              block_tokens=[32, 16], row_tiles=[32, 16]),
      *a, *b)
  for (o, lse), part in (((oa, la), a), ((ob, lb), b)):
    want_o, want_lse = compiled(lambda *x: paged_decode_attention(*x, num_splits=1), part[0],
                                kp, vp, *part[1:])
    np.testing.assert_allclose(np.asarray(o), np.asarray(want_o), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5)
  # Unmerged: part a's 3 split partials, merged here, give the merged result.
  (pa, pla), (pb, plb) = compiled(
      lambda *x: paged_decode_attention_parts([x[:3], x[3:]], kp, vp, num_splits=[3, 1],
                                              block_tokens=[32, 16], row_tiles=[32, 16],
                                              merge_splits=False), *a, *b)
  assert pa.shape == (2, K, 3, 20, E) and pla.shape == (2, K, 3, 20) and pb.shape[2] == 1
  o, lse = merge_partials(pa, pla, axis=2)
  np.testing.assert_allclose(np.asarray(o), np.asarray(oa), atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(la), atol=2e-5)
  with pytest.raises(ValueError, match="num_splits needs one entry per part"):
    paged_decode_attention_parts([a, b], kp, vp, num_splits=[2])
  with pytest.raises(ValueError, match="block_tokens must be a power of two >= 16, got 24"):
    paged_decode_attention_parts([a, b], kp, vp, block_tokens=[24, 16])
  with pytest.raises(ValueError, match="row_tiles must be powers of two >= 16, got 8"):
    paged_decode_attention_parts([a, b], kp, vp, row_tiles=[8, 16])
  with pytest.raises(ValueError, match="at least one part"):
    paged_decode_attention_parts([], kp, vp)


def test_paged_decode_bad_input():
  q = jnp.zeros((2, 2, 4, 16))
  kp = jnp.zeros((2, 8, 16, 16))
  with pytest.raises(ValueError, match="tables must be"):
    paged_decode_attention(q, kp, kp, jnp.zeros((3, 4), jnp.int32), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="page size must be a power of two >= 16"):
    paged_decode_attention(q, kp[:, :, :8], kp[:, :, :8], jnp.zeros((2, 4), jnp.int32),
                           jnp.zeros(2, jnp.int32))
