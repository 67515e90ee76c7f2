"""One decode step of attention as SecretFlow SPU runs it: the full baselines and MPCache's.

Axes: H heads, E head dim, T cached tokens (after static eviction: T'), C clusters of S tokens,
k selected clusters. Everything is one sequence (MPC serves batch 1) and every input is secret.
q arrives scaled by 1 / sqrt(E) (folded into the public W_q), for every method alike.

What SPU charges shaped the code: a batched dot_general costs messages per head, so per-head
products run as one product with a block-diagonal operand; every fixed-point product costs a
truncation (about 2 messages under ABY3, about 230 under Cheetah), so comparison bits stay
integers, the similarity's alpha is applied as integer weights, and the softmax normalises once.

This module is what the SPU worker (mpc.worker) compiles, so it uses only the jax.numpy that
jax 0.4.34 (SPU 0.9.5's) and the project's JAX share, and imports nothing from the project.
The same functions run in plain JAX for the tests (equal to the plaintext path).

    full_softmax    the paper's baseline, most likely: softmax(q K^T / sqrt(E)) V
    full_deferred   the optimised baseline: exp(s - max) V, normalised after P.V (H x E
                    divisions instead of H x T)
    naive_topk      plaintext-style selection ported as is: top-k token scores by sorting, then
                    a masked softmax over all T
    mpcache_step    MPCache's dynamic selection over clusters of the statically kept tokens:
                    cluster score q . (alpha r_max + (1 - alpha) r_min) (or Quest's upper
                    bound from the same r_max / r_min), a constant-round
                    selection (pairwise comparisons -> ranks -> one-hot), scores gathered by a
                    one-hot matrix product, softmax over the selected tokens only, and the
                    probabilities scattered back for P.V; with `sel` given (cross-layer index
                    sharing) the selection is skipped
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def block_diag(x):
  """[H, H * M] from x [H, M]: row h holds x[h] in column block h (a select with a public
  pattern: no communication). Per-head products then run as ONE matrix product, which SPU sends
  in a constant number of messages, where a batched dot_general costs messages per head."""
  h, m = x.shape
  eye = np.eye(h, dtype=bool)[:, :, None]
  return jnp.where(eye, x[None, :, :], jnp.zeros_like(x)[None]).reshape(h, h * m)


def per_head(a, b):
  """[H, N]: a [H, M] times b [H, M, N] per head, as one product block_diag(a) @ b stacked."""
  h, m, n = b.shape
  return block_diag(a) @ b.reshape(h * m, n)


def scores(q, k):
  """[H, T] = q k^T; q [H, E] (pre-scaled), k [H, T, E]."""
  return per_head(q, k.transpose(0, 2, 1))


def normalised(e, v):
  """[H, E] = (e V) / sum(e): one product, H reciprocals, one multiply (e [H, T] >= 0)."""
  return per_head(e, v) * (1.0 / jnp.sum(e, axis=-1))[:, None]


def full_softmax(q, k, v):
  """[H, E] softmax attention, normalising the probabilities (H x T divisions)."""
  return per_head(jax.nn.softmax(scores(q, k), axis=-1), v)


def full_deferred(q, k, v):
  """[H, E] softmax attention normalised after P.V (H reciprocals instead of H x T)."""
  s = scores(q, k)
  return normalised(jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), v)


def naive_topk(q, k, v, *, keep: int):
  """[H, E]: attention over each head's `keep` highest-scoring tokens, the plaintext recipe
  ported directly: a sort per head for the k-th score, a threshold mask, a masked softmax."""
  s = scores(q, k)
  kth = jnp.sort(s, axis=-1)[:, -keep][:, None]
  ok = s >= kth
  e = jnp.where(ok, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
  return normalised(e, v)


def update_bounds(r_max, r_min, k_new, cluster):
  """The incremental per-channel max / min of the cluster that receives the new token.

  r_max, r_min: [H, C, E]; k_new [H, E]; cluster: the (public) cluster index of the token's slot.
  A fresh cluster (its first token) takes the token itself.
  """
  # One batch of comparisons and one select for both bounds: [k > r_max, r_min > k].
  a = jnp.concatenate([k_new, r_min[:, cluster]], axis=-1)
  b = jnp.concatenate([r_max[:, cluster], k_new], axis=-1)
  e = k_new.shape[-1]
  old = jnp.concatenate([r_max[:, cluster], r_min[:, cluster]], axis=-1)
  hi_lo = jnp.where(a > b, jnp.concatenate([k_new, k_new], axis=-1), old)
  hi, lo = hi_lo[:, :e], hi_lo[:, e:]
  return r_max.at[:, cluster].set(hi), r_min.at[:, cluster].set(lo)


def pair_index(n: int):
  """Public [P] indices (i, j), i < j, of every pair of n items, and [P, n] one-hot matrices."""
  i, j = np.triu_indices(n, 1)
  a = np.zeros((len(i), n), np.float32)
  b = np.zeros((len(i), n), np.float32)
  a[np.arange(len(i)), i] = 1
  b[np.arange(len(i)), j] = 1
  return i, j, a, b


def cluster_scores(q, r_max, r_min, alpha: float):
  """[H, C] MPCache's linear cluster score q . (alpha r_max + (1 - alpha) r_min), times d when
  alpha = n / d with d <= 8 (0.6 = 3 / 5): then n q.r_max + (d - n) q.r_min by additions, one
  product and no truncation for alpha. A positive multiple ranks the clusters alike."""
  from fractions import Fraction
  h, c, _ = r_max.shape
  both = per_head(q, jnp.concatenate([r_max, r_min], axis=1).transpose(0, 2, 1))
  hi, lo = both[:, :c], both[:, c:]
  frac = Fraction(alpha).limit_denominator(8)
  if abs(float(frac) - alpha) > 1e-9:
    return alpha * hi + (1.0 - alpha) * lo
  out = jnp.zeros_like(hi)
  for _ in range(frac.numerator):
    out = out + hi
  for _ in range(frac.denominator - frac.numerator):
    out = out + lo
  return out


def upper_scores(q, r_max, r_min):
  """[H, C] Quest's bound of each cluster's largest q . k: sum_e max(q_e r_max_e, q_e r_min_e)
  = q . r, r_e = r_max_e where q_e >= 0 else r_min_e. One batch of H x E sign tests (of q, not
  per cluster), one select of the bounds by the sign bits, one product: constant rounds."""
  pos = q >= 0  # [H, E]
  r = jnp.where(pos[:, None, :], r_max, r_min)  # [H, C, E]
  return per_head(q, r.transpose(0, 2, 1))


def rank_select(c, keep: int):
  """[H, n, keep] one-hot selection of each head's `keep` highest scores c [H, n] (float 0/1).

  Constant rounds: one batch of n (n - 1) / 2 comparisons gives every item's rank (the number
  of items above it, ties to the lower index), one batch of n x keep equality tests turns ranks
  into one-hot columns; column r is the item of rank r. No sort, no secret-indexed gather.
  """
  n = c.shape[-1]
  i, j, a, b = pair_index(n)
  above = (c[:, j] > c[:, i]).astype(jnp.int32)  # [H, P]: item j beats item i
  # Item i gains the pairs it loses (above), item j the others: rank = above a + (1 - above) b,
  # one integer product of the comparison bits and public matrices (no truncation).
  rank = above @ (a - b).astype(np.int32) + b.sum(axis=0).astype(np.int32)
  onehot = rank[:, :, None] == jnp.arange(keep, dtype=jnp.int32)[None, None, :]
  # One conversion of the bits to arithmetic shares here, not one per use of the matrix.
  return jnp.where(onehot, 1.0, 0.0) + jnp.zeros_like(c)[:, :, None]


def block_diag3(m):
  """[H * R, H * C] block-diagonal matrix of the H blocks m [H, R, C] (public pattern)."""
  h, r, c = m.shape
  eye = np.eye(h, dtype=bool)[:, None, :, None]
  return jnp.where(eye, m[:, :, None, :], jnp.zeros_like(m)[:, :, None, :]).reshape(h * r, h * c)


def mpcache_step(q, k, v, r_max, r_min, *, size: int, keep: int, length: int,
                 alpha: float = 0.6, sel=None, stabiliser: str = "exact",
                 score: str = "linear"):
  """[H, E] MPCache's decode-step attention over T' statically kept tokens (and the selection).

  Args:
    q: [H, E]; k, v: [H, T', E] the kept tokens in clusters of `size` (T' = C * size).
    r_max, r_min: [H, C, E] per-channel bounds of each cluster's keys (kept incrementally).
    keep: clusters selected among the middle C - 2 (cluster 0, the attention sink, and the
      last, the recent tokens, are always attended).
    length: tokens held (public): slots at or beyond it are empty.
    sel: [H, C - 2, keep] a previous layer's selection (cross-layer index sharing), or None.
    stabiliser: what the softmax subtracts before exp: "exact", the max of the attended scores
      (log-depth comparisons), or "cluster", the mean score of the top-ranked cluster's tokens
      (a sum, no comparisons; softmax is unchanged by the choice, only the fixed-point range
      is: exp(s - m) must stay below 2^(63 - f) with f = 18 fraction bits, s - m < ~30).
    score: how clusters are ranked: "linear", the paper's q . (alpha r_max + (1 - alpha)
      r_min), or "upper", Quest's bound (upper_scores).
  Returns:
    (out [H, E], sel [H, C - 2, keep]).
  """
  h, t, _ = k.shape
  n = t // size
  s = scores(q, k)
  blocks = s.reshape(h, n, size)
  if sel is None:
    if score == "linear":
      c = cluster_scores(q, r_max, r_min, alpha)[:, 1:-1]
    elif score == "upper":
      c = upper_scores(q, r_max, r_min)[:, 1:-1]
    else:
      raise ValueError(f"score must be 'linear' or 'upper', got {score!r}")
    sel = rank_select(c, keep)
  # Gather the selected clusters' scores: sel^T @ blocks per head, as one product.
  picked = (block_diag3(sel.transpose(0, 2, 1)) @ blocks[:, 1:-1].reshape(h * (n - 2), size)
            ).reshape(h, keep, size)
  att = jnp.concatenate([blocks[:, :1], picked, blocks[:, -1:]], axis=1)  # [H, keep + 2, S]
  if stabiliser == "exact":
    m = jnp.max(att.reshape(h, -1), axis=-1)
  elif stabiliser == "cluster":
    m = jnp.mean(picked[:, 0], axis=-1)  # column 0 of the selection: the top-ranked cluster
  else:
    raise ValueError(f"stabiliser must be 'exact' or 'cluster', got {stabiliser!r}")
  valid = np.arange(t).reshape(n, size) < length  # public: only the last cluster has holes
  valid_att = np.concatenate([valid[:1], np.ones((keep, size), bool), valid[-1:]])
  e = jnp.where(valid_att[None], jnp.exp(att - m[:, None, None]), 0.0)
  # The probabilities back to their clusters (sel @ e per head), then P.V as for the full cache.
  back = (block_diag3(sel) @ e[:, 1:-1].reshape(h * keep, size)).reshape(h, n - 2, size)
  full = jnp.concatenate([e[:, :1], back, e[:, -1:]], axis=1).reshape(h, t)
  return normalised(full, v), sel


def mpcache_shared(q, k, v, r_max, r_min, sel, **kw):
  """mpcache_step of a layer that reuses `sel` from the layer before (cross-layer sharing):
  no cluster scores, no comparisons. Positional, so the SPU worker can pass `sel` as a secret."""
  return mpcache_step(q, k, v, r_max, r_min, sel=sel, **kw)
