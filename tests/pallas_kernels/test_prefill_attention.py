"""Cache prefill attention (interpret mode on CPU) against an independent float64 NumPy reference.

Every run draws fresh inputs; the seed is printed (pytest shows it on failure).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.prefill import (
    _visit_lists,
    cache_prefill_attention,
    cache_prefill_attention_reference,
    supports,
)


def _inputs(rng, B, K, G, T, N, E, dtype, layout, nan_empty=False):
  """A random cache and chunk.

  'random': stored positions drawn without replacement from [8, 8 + 2N) in random slot order,
  ~20% of slots empty, sequence B-1 has one KV head with no token at all; sequence 0's queries
  sit at 0..T-1, so its first 8 rows see nothing, the others' at a random start.
  'common': the prefill layout: slots 0..P+T-1 hold positions 0..P+T-1 in order, the rest are
  empty, queries at P..P+T-1 (P random, per sequence).
  """
  q = rng.standard_normal((B, K, G, T, E)).astype(np.float32)
  k = rng.standard_normal((B, K, N, E)).astype(np.float32)
  v = rng.standard_normal((B, K, N, E)).astype(np.float32)
  if layout == "random":
    pos = np.stack([np.stack([8 + rng.choice(2 * N, N, replace=False) for _ in range(K)])
                    for _ in range(B)]).astype(np.int32)
    pos[rng.random(pos.shape) < 0.2] = -1
    pos[B - 1, K - 1] = -1
    starts = [0] + [int(rng.integers(0, 2 * N)) for _ in range(B - 1)]
    q_pos = np.stack([s + np.arange(T) for s in starts]).astype(np.int32)
  else:
    pos = np.full((B, K, N), -1, np.int32)
    q_pos = np.zeros((B, T), np.int32)
    for b in range(B):
      P = int(rng.integers(0, N - T + 1))
      pos[b, :, :P + T] = np.arange(P + T)
      q_pos[b] = P + np.arange(T)
  if nan_empty:  # empty slots may hold anything
    k[pos < 0] = np.nan
    v[pos < 0] = np.nan
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return q, k, v, jnp.asarray(pos), jnp.asarray(q_pos)


def _numpy_attention(q, k, v, pos, q_pos, sm_scale=None):
  """float64 softmax per (sequence, KV head) over an explicit boolean mask [T, N] built from the
  contract: slot n valid for query t iff 0 <= pos[b, k, n] <= q_pos[b, t]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  pos, q_pos = np.asarray(pos), np.asarray(q_pos)
  B, K, G, T, E = q.shape
  scale = 1.0 / np.sqrt(E) if sm_scale is None else sm_scale
  o = np.zeros(q.shape)
  lse = np.full(q.shape[:-1], -np.inf)
  for b in range(B):
    for h in range(K):
      ok = (pos[b, h][None, :] >= 0) & (pos[b, h][None, :] <= q_pos[b][:, None])  # [T, N]
      live = pos[b, h] >= 0
      kk, vv = np.where(live[:, None], k[b, h], 0.0), np.where(live[:, None], v[b, h], 0.0)
      s = np.where(ok, q[b, h] @ kk.T * scale, -np.inf)  # [G, T, N]
      m = s.max(-1, keepdims=True)
      m = np.where(np.isfinite(m), m, 0.0)
      w = np.where(ok, np.exp(s - m), 0.0)
      l = w.sum(-1, keepdims=True)
      o[b, h] = (w / np.where(l == 0, 1.0, l)) @ vv
      lse[b, h] = np.where(l == 0, -np.inf, m + np.log(np.where(l == 0, 1.0, l)))[..., 0]
  return o, lse


def _check(o, lse, want_o, want_lse, dtype, shape):
  o32 = np.asarray(o, np.float32)
  lse = np.asarray(lse)
  assert o.shape == shape and o.dtype == dtype
  assert lse.shape == shape[:-1] and lse.dtype == np.float32
  assert not np.isnan(o32).any() and not np.isnan(lse).any()
  # Relative error; absolute where every row sees nothing (a random layout can do that at T=1).
  err = np.linalg.norm(o32 - want_o) / max(np.linalg.norm(want_o), 1.0)
  assert err < (1e-5 if dtype == jnp.float32 else 1e-2), err
  empty = np.isinf(want_lse)
  assert (np.isneginf(lse) == empty).all()
  assert (o32[empty] == 0.0).all()
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  assert np.allclose(lse[~empty], want_lse[~empty], atol=tol, rtol=tol)


@pytest.mark.parametrize("G,T,N,E,dtype,layout,block_q,block_k", [
    (1, 48, 128, 32, jnp.float32, "random", 16, 16),
    (4, 37, 256, 16, jnp.bfloat16, "random", 16, 32),  # T not a multiple of block_q
    (8, 20, 128, 16, jnp.float32, "common", 16, 16),
    (4, 45, 256, 32, jnp.bfloat16, "common", 32, 16),
    (4, 1, 64, 16, jnp.float32, "random", 64, 16),  # one query: block_q clipped to 16
])
def test_prefill_matches_numpy(G, T, N, E, dtype, layout, block_q, block_k, seed, compiled):
  rng = np.random.default_rng(seed)
  B, K = 2, 2
  args = _inputs(rng, B, K, G, T, N, E, dtype, layout, nan_empty=G == 4)
  run = lambda *a: cache_prefill_attention(*a, block_q=block_q, block_k=block_k)
  o, lse = compiled(run, *args)
  want_o, want_lse = _numpy_attention(*args)
  if layout == "random":  # the empty KV head and sequence 0's early rows see nothing
    assert np.isinf(want_lse[B - 1, K - 1]).all() and np.isinf(want_lse[0, :, :, 0]).all()
  _check(o, lse, want_o, want_lse, dtype, (B, K, G, T, E))


def test_reference_and_slot_attention_match_numpy(seed):
  """The jnp reference, and the slot_attention this kernel replaces, keep the same contract."""
  from kvcache.attention import slot_attention
  rng = np.random.default_rng(seed)
  args = _inputs(rng, 2, 2, 4, 9, 40, 24, jnp.float32, "random")  # any N, E
  want = _numpy_attention(*args, sm_scale=0.3)
  _check(*cache_prefill_attention_reference(*args, sm_scale=0.3), *want, jnp.float32,
         (2, 2, 4, 9, 24))
  o, lse, _ = slot_attention(*args, scale=0.3)
  _check(o, lse, *want, jnp.float32, (2, 2, 4, 9, 24))


def test_sm_scale_and_all_invalid(seed, compiled):
  """sm_scale scales the logits; queries before every stored token get o = 0, lse = -inf."""
  rng = np.random.default_rng(seed)
  q, k, v, pos, q_pos = _inputs(rng, 1, 2, 2, 24, 64, 16, jnp.float32, "random")
  run = lambda *a: cache_prefill_attention(*a, sm_scale=0.3, block_q=16, block_k=16)
  o, lse = compiled(run, q, k, v, pos, q_pos + 40)
  _check(o, lse, *_numpy_attention(q, k, v, pos, q_pos + 40, sm_scale=0.3), jnp.float32,
         q.shape)
  o, lse = cache_prefill_attention(q, k, v, jnp.maximum(pos, 100), q_pos, block_q=16,
                                   block_k=16)
  assert (np.asarray(o) == 0).all() and np.isneginf(np.asarray(lse)).all()


def test_visit_lists_skip_blocks():
  """Common layout, P = 40, T = 24 in 128 slots, blocks of 16: row block i (rows 16i..16i+15 of
  the stacked G = 2 heads) visits the slot blocks up to its last position, unmasked those wholly
  at or before its first position; the slot blocks past P + T are never visited."""
  B, K, G, T, N, P, bq, bk = 1, 1, 2, 24, 128, 40, 16, 16
  pos = np.full((B, K, N), -1, np.int32)
  pos[..., :P + T] = np.arange(P + T)
  rows = np.tile(P + np.arange(T), G)  # [G * T]: row g * T + t at P + t
  rpos = np.pad(rows, (0, -len(rows) % bq), constant_values=-1)[None]
  lists = _visit_lists(jnp.asarray(pos), jnp.asarray(rpos, jnp.int32), G * T, bq, bk)
  count, nfull = np.asarray(lists.count)[0], np.asarray(lists.nfull)[0]
  lo = [rows[i * bq:(i + 1) * bq].min() for i in range(len(count))]
  hi = [rows[i * bq:(i + 1) * bq].max() for i in range(len(count))]
  assert list(count) == [h // bk + 1 for h in hi]
  assert list(nfull) == [(lo_ + 1) // bk for lo_ in lo]
  assert count.max() == (P + T - 1) // bk + 1 < N // bk
  cols = np.asarray(lists.cols)[0]
  for i, (c, f) in enumerate(zip(count, nfull)):
    assert sorted(cols[i, :c]) == list(range(c)) and list(cols[i, :f]) == list(range(f))


def test_supports():
  assert supports(1, 64, 16) and supports(4096, 32768, 128) and supports(7, 32, 16, block_k=16)
  assert not supports(0, 64, 16) and not supports(8, 48, 16) and not supports(8, 64, 24)
  assert not supports(8, 0, 16) and not supports(8, 64, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(2, 2, 4, 16)), "q must be 5-D"),
    (dict(k=(2, 2, 64)), "k must be 4-D"),
    (dict(v=(2, 2, 32, 16)), "must agree"),
    (dict(k=(2, 3, 64, 16), v=(2, 3, 64, 16), pos=(2, 3, 64)), "does not match q"),
    (dict(kdtype=jnp.int32), "k must be a float"),
    (dict(pos=(2, 2, 32)), "pos must be"),
    (dict(posdtype=jnp.float32), "pos must be"),
    (dict(q_pos=(2,)), "q_pos must be"),
    (dict(qposdtype=jnp.float32), "q_pos must be"),
    (dict(k=(2, 2, 40, 16), v=(2, 2, 40, 16), pos=(2, 2, 40)), "N=40"),
    (dict(q=(2, 2, 4, 8, 24), k=(2, 2, 64, 24), v=(2, 2, 64, 24)), "head_dim E=24"),
    (dict(q=(2, 2, 4, 0, 16), q_pos=(2, 0)), "T=0"),
    (dict(block_q=48), "block_q"),
    (dict(block_k=8), "block_k"),
    (dict(block_k=128), "N=64"),
])
def test_prefill_bad_input_raises(kwargs, match):
  get = lambda name, default: kwargs.get(name, default)
  q = jnp.zeros(get("q", (2, 2, 4, 8, 16)))
  k = jnp.zeros(get("k", (2, 2, 64, 16)), get("kdtype", jnp.float32))
  v = jnp.zeros(get("v", k.shape), k.dtype)
  pos = jnp.zeros(get("pos", (2, 2, 64)), get("posdtype", jnp.int32))
  q_pos = jnp.zeros(get("q_pos", (2, 8)), get("qposdtype", jnp.int32))
  with pytest.raises(ValueError, match=match):
    cache_prefill_attention(q, k, v, pos, q_pos, block_q=get("block_q", 64),
                            block_k=get("block_k", 16))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_through_triton(dtype):
  """The production tiling lowers through Pallas' Triton lowering (cross-lowered for CUDA here,
  so a construct that lowering rejects fails on CPU too; Triton's own compile is not run)."""
  B, K, G, T, N, E = 1, 4, 4, 300, 4096, 128
  shapes = ((B, K, G, T, E), (B, K, N, E), (B, K, N, E), (B, K, N), (B, T))
  dtypes = (dtype, dtype, dtype, jnp.int32, jnp.int32)
  args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)]
  run = jax.jit(lambda *a: cache_prefill_attention(*a, interpret=False))
  text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "gpu.triton" in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,layout", [(jnp.bfloat16, "common"), (jnp.bfloat16, "random"),
                                          (jnp.float32, "common")])
def test_prefill_compiled_gpu(dtype, layout, seed):
  rng = np.random.default_rng(seed)
  B, K, G, T, N, E = 2, 4, 4, 300, 4096, 128  # T not a multiple of the 64-row blocks
  args = _inputs(rng, B, K, G, T, N, E, dtype, layout, nan_empty=True)
  o, lse = cache_prefill_attention(*args, interpret=False)
  _check(o, lse, *_numpy_attention(*args), dtype, (B, K, G, T, E))
