"""Exact combination of partial attentions over disjoint key sets by their log-sum-exps.

If o_a = softmax(s_a) v_a with lse_a = log sum exp(s_a), and likewise for b, then attention over
the union of the two key sets is (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b}), with
log-sum-exp log(e^{lse_a} + e^{lse_b}). An empty set has lse = -inf and contributes nothing; two
empty sets give 0 and -inf. This is how a shared prefix and a per-sequence suffix, or the splits
of split-K decoding, are put together.
"""

from __future__ import annotations

import jax.numpy as jnp


def merge_attention(out_a, lse_a, out_b, lse_b):
  """Attention over the union of two disjoint key sets.

  Args:
    out_a: [..., E] attention output over key set a.
    lse_a: [...] natural log-sum-exp of a's logits (-inf where a is empty).
    out_b: [..., E] output over key set b, same shape as out_a.
    lse_b: [...] log-sum-exp over b.
  Returns:
    (out [..., E] in out_a's dtype, lse [...] float32).
  Raises:
    ValueError: if the shapes do not match.
  """
  if out_a.shape != out_b.shape:
    raise ValueError(f"out_a {out_a.shape} and out_b {out_b.shape} must have the same shape")
  for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
    if lse.shape != out_a.shape[:-1]:
      raise ValueError(f"{name} must have shape {out_a.shape[:-1]} (out without its last axis), "
                       f"got {lse.shape}")
  out, lse = merge_partials(jnp.stack([out_a, out_b]), jnp.stack([lse_a, lse_b]), axis=0)
  return out.astype(out_a.dtype), lse


def merge_partials(outs, lses, axis: int = 0):
  """Merges partial attentions stacked along `axis` (outs [..., E], lses = outs without E; axis
  not E's, counted from the front).

  Returns (out float32, lse float32) with `axis` reduced. Written as reductions over the axis:
  on an H200 an elementwise form (the parts taken one by one) made split-K decode's merge up
  to 2x slower.
  """
  outs = outs.astype(jnp.float32)
  lses = lses.astype(jnp.float32)
  m = jnp.max(lses, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # all parts empty: weights e^{-inf} = 0
  w = jnp.exp(lses - m)  # [..., parts, ...]
  total = jnp.sum(w, axis=axis, keepdims=True)
  out = jnp.sum(outs * (w / jnp.where(total == 0, 1.0, total))[..., None], axis=axis)
  lse = jnp.where(total == 0, -jnp.inf, m + jnp.log(jnp.where(total == 0, 1.0, total)))
  return out, jnp.squeeze(lse, axis)


def merge_attention_reference(out_a, lse_a, out_b, lse_b):
  """The same merge written with logaddexp (float32), for tests."""
  lse = jnp.logaddexp(lse_a.astype(jnp.float32), lse_b.astype(jnp.float32))
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  wa = jnp.exp(lse_a - safe)[..., None]
  wb = jnp.exp(lse_b - safe)[..., None]
  out = jnp.where(jnp.isfinite(lse)[..., None], wa * out_a + wb * out_b, 0.0)
  return out.astype(jnp.float32), lse



def masked_softmax(s, valid):
  """The references' softmax: (p, lse) of float32 scores s [..., N] under bool valid (broadcast
  to s): p normalised over the valid entries (0 elsewhere; all 0 in a row with none), lse [...]
  the natural log-sum-exp (-inf in such a row)."""
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))[..., 0]
  return p / jnp.where(l == 0, 1.0, l), lse
