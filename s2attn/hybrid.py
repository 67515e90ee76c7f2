"""Hybrid sparse/dense stacks: the per-layer attention specs (ModelConfig.layer_attn).

The paper's best models keep some layers dense (S2-Attention, section 4): `hybrid_layer_attn(
n_layers, s2_spec(pattern), dense_every=4)` makes layers 3, 7, ... dense and the others S2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from s2attn.pattern import S2Pattern


def s2_spec(pattern: S2Pattern, *, per_kv_head: bool = False, impl: str | None = None) -> str:
  """The attention spec string 's2:block_size=..,...' of a pattern (non-default fields only)."""
  opts = {"block_size": pattern.block_size, "local_blocks": pattern.local_blocks,
          "vert_stride": pattern.vert_stride}
  for f in dataclasses.fields(S2Pattern):
    val = getattr(pattern, f.name)
    if f.name not in opts and val != f.default:
      opts[f.name] = val
  if per_kv_head:
    opts["per_kv_head"] = True
  if impl is not None:
    opts["impl"] = impl
  return "s2:" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                          for k, v in opts.items())


def dense_layer_ids(n_layers: int, *, dense_every: int | None = None,
                    dense_layers: Iterable[int] = ()) -> tuple[int, ...]:
  """Layers that stay dense: every dense_every-th (layers n-1, 2n-1, ...) and/or a list."""
  ids = {int(i) for i in dense_layers}
  bad = sorted(i for i in ids if not 0 <= i < n_layers)
  if bad:
    raise ValueError(f"dense_layers {bad} out of range for n_layers={n_layers}")
  if dense_every is not None:
    if dense_every < 1:
      raise ValueError(f"dense_every must be >= 1, got {dense_every}")
    ids |= set(range(dense_every - 1, n_layers, dense_every))
  return tuple(sorted(ids))


def hybrid_layer_attn(n_layers: int, sparse: str, *, dense: str = "auto",
                      dense_every: int | None = None, dense_layers: Iterable[int] = ()
                      ) -> tuple[str, ...]:
  """Per-layer attention specs: `dense` at the dense layers, `sparse` everywhere else.

  Args:
    n_layers: layers of the stack.
    sparse: the sparse spec, e.g. s2_spec(S2Pattern(64, 8, 8)).
    dense: the dense spec ('auto' = cuDNN on GPU, reference elsewhere).
    dense_every: every n-th layer is dense (layers n-1, 2n-1, ...).
    dense_layers: explicit dense layer indices (combined with dense_every).
  Returns:
    a tuple of n_layers specs for ModelConfig.layer_attn.
  """
  ids = set(dense_layer_ids(n_layers, dense_every=dense_every, dense_layers=dense_layers))
  return tuple(dense if i in ids else sparse for i in range(n_layers))
