"""Chain-aware primitives: ChainLinear causality and dense equivalence, ChainRMSNorm, RoPE.

Weights and inputs come from NumPy generators and every JAX computation runs under one jit:
eager ops and jax.random compile a kernel per shape, which would dominate the run time on CPU.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.layers import ChainLinear, ChainRMSNorm, cumsum, rope


def _bounds(dims):
  return (0,) + cumsum(dims)


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _chain_linear(in_dims, out_dims, seed) -> ChainLinear:
  """A ChainLinear built abstractly with N(0, 1) NumPy kernels (no per-shape init kernels)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: ChainLinear(in_dims, out_dims,
                                                                  rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(state)
  new = [_normal(seed * 100 + i, x.shape) for i, x in enumerate(leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


@pytest.mark.parametrize(
    "in_dims, out_dims, seed",
    [
        ((3, 3), (5, 5), 1),  # equal chains (1, 1)
        ((3, 6, 3), (5, 10, 5), 2),  # unequal chains (1, 2, 1)
        ((4, 4, 4, 4), (3, 3, 3, 3), 3),  # (8, 8, 8, 8) scaled down
        ((2, 7), (11, 3), 4),  # input and output splits in different proportions
    ],
)
def test_chain_linear_jacobian_blocks(in_dims, out_dims, seed):
  """d y_i / d x_j is exactly zero for j > i, and the blocks j <= i equal the kernel rows."""
  layer = _chain_linear(in_dims, out_dims, seed)
  x = _normal(seed + 50, (sum(in_dims),))
  jac = np.asarray(jax.jit(jax.jacobian(lambda v: layer(v)))(x))  # [sum(out), sum(in)]
  assert jac.shape == (sum(out_dims), sum(in_dims))
  ib, ob = _bounds(in_dims), _bounds(out_dims)
  for i, j in itertools.product(range(len(out_dims)), range(len(in_dims))):
    block = jac[ob[i]:ob[i + 1], ib[j]:ib[j + 1]]
    if j > i:
      assert np.all(block == 0.0), (i, j)
    else:
      kernel = np.asarray(layer.kernels[i][...])  # [sum(in[:i+1]), out_i]
      np.testing.assert_allclose(block, kernel[ib[j]:ib[j + 1]].T, rtol=1e-6)
      assert np.all(block != 0.0)


@pytest.mark.parametrize("in_dims, out_dims, seed", [((3, 6, 3), (5, 10, 5), 5),
                                                     ((4, 4, 4, 4), (3,) * 4, 6)])
def test_chain_linear_num_chains_is_prefix_and_masked_dense(in_dims, out_dims, seed):
  """The k-chain call on the first k input chains gives the first k output chains, and the full
  call equals x @ W with W the block-lower-triangular dense matrix built from the kernels."""
  layer = _chain_linear(in_dims, out_dims, seed)
  x = _normal(seed + 50, (2, 3, sum(in_dims)))
  n, cin, cout = len(in_dims), cumsum(in_dims), cumsum(out_dims)
  outs = jax.jit(lambda v: [layer(v)] + [layer(v[..., : cin[k - 1]], num_chains=k)
                                         for k in range(1, n)])(x)
  full = np.asarray(outs[0])
  for k in range(1, n):
    np.testing.assert_allclose(outs[k], full[..., : cout[k - 1]], rtol=1e-6, atol=1e-6)
  dense = np.zeros((cin[-1], cout[-1]))
  ob = _bounds(out_dims)
  for i in range(n):
    dense[: cin[i], ob[i]:ob[i + 1]] = np.asarray(layer.kernels[i][...])
  np.testing.assert_allclose(full, np.asarray(x, np.float64) @ dense, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="expects last dim"):
    layer(x, num_chains=1)


def test_chain_linear_single_chain_is_dense():
  layer = _chain_linear((13,), (7,), 7)
  x = _normal(8, (2, 5, 13))
  w = np.asarray(layer.kernels[0][...], np.float64)
  assert w.shape == (13, 7)
  y = jax.jit(lambda v: layer(v))(x)
  np.testing.assert_allclose(y, np.asarray(x, np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_chain_linear_mismatched_chain_counts():
  with pytest.raises(ValueError, match="different chain counts"):
    ChainLinear((2, 2), (3,), rngs=nnx.Rngs(0))


def test_chain_rmsnorm_per_chain():
  dims, eps = (3, 5, 2), 1e-6
  norm = ChainRMSNorm(dims, eps=eps)
  scale = _normal(1, (10,))
  norm.scale[...] = scale
  x = _normal(2, (4, 10), 3.0)
  y, y2, jac = jax.jit(lambda v: (norm(v), norm(v[:, :8], num_chains=2),
                                  jax.jacobian(lambda u: norm(u))(v[0])))(x)
  y, jac = np.asarray(y), np.asarray(jac)
  xs, s = np.asarray(x, np.float64), np.asarray(scale, np.float64)
  b = _bounds(dims)
  for a, e in zip(b[:-1], b[1:]):
    xi = xs[:, a:e]
    ref = xi / np.sqrt(np.mean(xi * xi, -1, keepdims=True) + eps) * s[a:e]
    np.testing.assert_allclose(y[:, a:e], ref, rtol=1e-5, atol=1e-6)
  # Each chain is normalised on its own: the Jacobian is block diagonal.
  for i, j in itertools.product(range(3), range(3)):
    if i != j:
      assert np.all(jac[b[i]:b[i + 1], b[j]:b[j + 1]] == 0), (i, j)
  np.testing.assert_allclose(y2, y[:, :8], rtol=1e-6)


def test_rope_rotate_half_and_relative():
  e, theta = 6, 10000.0
  x = _normal(5, (2, 3, 4, e))
  pos = jnp.array([[0, 1, 7], [3, 4, 5]], jnp.int32)
  q, k = x[:1, :1], x[1:, :1]

  @jax.jit
  def f(x, pos):
    dots = [jnp.sum(rope(q, jnp.full((1, 1), p), theta) * rope(k, jnp.full((1, 1), p + 3), theta))
            for p in (0, 5, 11)]
    return rope(x, pos, theta), jnp.stack(dots)

  y, dots = f(x, pos)
  y = np.asarray(y, np.float64)
  xs = np.asarray(x, np.float64)
  ang = np.asarray(pos, np.float64)[..., None] / theta ** (np.arange(0, e, 2) / e)
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  h = e // 2
  ref = np.concatenate([xs[..., :h] * c - xs[..., h:] * s, xs[..., h:] * c + xs[..., :h] * s], -1)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[0, 0], xs[0, 0], rtol=1e-6)  # position 0 is the identity
  # Scores depend only on the offset: <R(p)q, R(p+3)k> is the same for every p.
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
