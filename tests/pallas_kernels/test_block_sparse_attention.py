"""Block-sparse attention kernel (Pallas interpret mode on CPU) against the dense float32 reference.

Every run draws fresh inputs and layouts; the seed is in each failure message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
  BlockSparseTiles,
  block_sparse_attention,
  block_sparse_attention_reference,
  causal_layout,
  s2_layout,
)
from pallas_kernels.layouts import layout_block_lists

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _rel(a, b) -> float:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(rng, B, T, H, K, E, dtype):
  q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
                 for s in ((B, T, H, E), (B, T, K, E), (B, T, K, E), (B, T, H, E)))
  return q, k, v, do


def _random_layout(rng, L, n, density, empty_row: bool):
  layout = rng.random((L, n, n)) < density
  if empty_row:  # one query block of layout head 0 attends nothing: its rows must give zeros
    layout[0, rng.integers(n)] = False
  return layout


def _fwd_bwd(attn, q, k, v, do, lse_weight):
  """(o, lse, dq, dk, dv) of loss = <o, do> + lse_weight * sum(lse)."""
  def loss(q, k, v):
    o, lse = attn(q, k, v)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + lse_weight * jnp.sum(
        finite), (o, lse)
  (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return (o, lse, *grads)


CASES = [
    # B, T, H, K, E, block, layout heads ("H", "K", "1"), causal, dtype
    (1, 96, 4, 2, 64, 16, "H", True, jnp.float32),
    (2, 64, 4, 4, 128, 32, "K", False, jnp.float32),
    (1, 100, 4, 1, 64, 16, "1", True, jnp.float32),  # T not a multiple of the block
    (1, 72, 6, 2, 64, 16, "K", False, jnp.float32),  # padded, non-causal: masked last key block
    (1, 64, 4, 2, 128, 16, "H", True, jnp.bfloat16),
    (2, 48, 2, 1, 64, 16, "1", False, jnp.bfloat16),
]


@pytest.mark.parametrize("B,T,H,K,E,bs,lh,causal,dtype", CASES)
def test_forward_and_grads_match_reference(B, T, H, K, E, bs, lh, causal, dtype, compiled):
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  n = -(-T // bs)
  L = {"H": H, "K": K, "1": 1}[lh]
  layout = _random_layout(rng, L, n, density=0.5, empty_row=True)
  q, k, v, do = _inputs(rng, B, T, H, K, E, dtype)
  lse_weight = 0.5 if dtype == jnp.float32 else 0.0

  kern = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=bs, causal=causal,
                                                return_lse=True)
  ref = lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, block_size=bs,
                                                         causal=causal, return_lse=True)
  got = compiled(lambda *a: _fwd_bwd(kern, *a, lse_weight), q, k, v, do)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  want = jax.jit(lambda *a: _fwd_bwd(ref, *a, lse_weight))(*f32)

  msg = f"seed={seed} case={(B, T, H, K, E, bs, lh, causal, jnp.dtype(dtype).name)}"
  for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape, (name, g.shape, w.shape, msg)
    assert not np.isnan(np.asarray(g, np.float32)).any(), f"NaN in {name}: {msg}"
    if name == "lse":
      w = np.asarray(w)
      g = np.asarray(g)
      assert (np.isinf(g) == np.isinf(w)).all(), f"empty rows differ: {msg}"
      g, w = g[np.isfinite(w)], w[np.isfinite(w)]
    err = _rel(g, w)
    assert err < TOL[dtype], f"{name} relative error {err:.2e}: {msg}"
  # Rows that attend no key give exactly zero.
  empty = ~np.asarray(block_sparse_attention_reference(
      q, k, v, layout, block_size=bs, causal=causal, return_lse=True)[1] > -np.inf)
  assert np.all(np.asarray(got[0], np.float32)[empty] == 0.0), msg


def test_traced_layout_under_jit_matches_numpy_layout(compiled):
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  B, T, H, K, E, bs = 1, 64, 2, 1, 64, 16
  layout = _random_layout(rng, H, T // bs, density=0.6, empty_row=False)
  q, k, v, _ = _inputs(rng, B, T, H, K, E, jnp.float32)
  traced = compiled(lambda q, k, v, lay: block_sparse_attention(q, k, v, lay, block_size=bs),
                     q, k, v, jnp.asarray(layout))
  want = block_sparse_attention_reference(q, k, v, layout, block_size=bs)
  assert _rel(traced, want) < 1e-4, f"seed={seed}"


def test_s2_layout_is_causal_and_covers_every_block():
  n, H = 32, 8  # stride <= heads: offsets 0..7 tile every residue
  layout = s2_layout(H, n, local_blocks=4, vert_stride=8)
  assert layout.shape == (H, n, n)
  assert not np.triu(layout, 1).any()
  assert layout.any(0)[np.tril_indices(n)].all()  # the heads together see every causal block
  assert (layout[0] != layout[1]).any()  # offsets differ per head
  assert causal_layout(n).sum() == n * (n + 1) // 2


def test_block_lists_order_unmasked_first():
  rng = np.random.default_rng()
  layout = rng.random((2, 7, 7)) < 0.6
  by_q, by_k = layout_block_lists(layout, causal=True, num_blocks=7, padded=True)
  eff = layout & np.tril(np.ones((7, 7), bool))
  for lists, mask, transposed in ((by_q, eff, False), (by_k, eff.transpose(0, 2, 1), True)):
    for l in range(2):
      for r in range(7):
        c, f = lists.count[l, r], lists.nfull[l, r]
        entries = lists.cols[l, r, :c]
        assert sorted(entries) == list(np.flatnonzero(mask[l, r]))
        # masked pairs (the diagonal, the padded last key block) come after every unmasked one
        masked = [e == r or (r if transposed else e) == 6 for e in entries]
        assert not any(masked[:f]) and all(masked[f:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_shape=(1, 64, 4, 64), k_shape=(1, 64, 3, 64)), "kv_heads"),
    (dict(q_shape=(1, 64, 4, 64), k_shape=(1, 48, 2, 64)), "k / v shape"),
    (dict(q_shape=(1, 64, 4), k_shape=(1, 64, 2, 64)), "q must be"),
    (dict(v_shape=(1, 64, 2, 32)), "k and v"),
    (dict(block_size=24), "block_size"),
    (dict(block_size=8), "block_size"),
    (dict(layout_shape=(3, 4, 4)), "layout"),
    (dict(layout_shape=(4, 4, 5)), "layout"),
    (dict(layout_shape=(4, 4)), "layout"),
])
def test_bad_input_raises_naming_the_argument(kwargs, match):
  q_shape = kwargs.get("q_shape", (1, 64, 4, 64))
  k_shape = kwargs.get("k_shape", (1, 64, 2, 64))
  v_shape = kwargs.get("v_shape", k_shape)
  bs = kwargs.get("block_size", 16)
  layout = np.ones(kwargs.get("layout_shape", (4, 4, 4)), bool)
  q, k, v = (jnp.zeros(s, jnp.float32) for s in (q_shape, k_shape, v_shape))
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, layout, block_size=bs)


def test_bad_tiles_raise():
  with pytest.raises(ValueError, match="num_warps_fwd"):
    BlockSparseTiles(num_warps_fwd=3)


@pytest.mark.gpu
@pytest.mark.parametrize("lh", ["H", "1"])
def test_compiled_gpu_kernel_matches_reference(lh):
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  B, T, H, K, E, bs = 2, 1024, 4, 2, 128, 64
  L = H if lh == "H" else 1
  layout = _random_layout(rng, L, T // bs, density=0.4, empty_row=True)
  q, k, v, do = _inputs(rng, B, T, H, K, E, jnp.bfloat16)
  kern = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=bs, return_lse=True,
                                                interpret=False)
  ref = lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, block_size=bs,
                                                         return_lse=True)
  got = jax.jit(lambda *a: _fwd_bwd(kern, *a, 0.0))(q, k, v, do)
  want = jax.jit(lambda *a: _fwd_bwd(ref, *a, 0.0))(*(x.astype(jnp.float32)
                                                       for x in (q, k, v, do)))
  for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    if name == "lse":
      g, w = g[np.isfinite(w)], w[np.isfinite(w)]
    assert _rel(g, w) < 2e-2, (name, _rel(g, w), seed)
