"""Flat named parameters of a model: {"layers.0.attn.q.kernels.1": array} and back.

Training, checkpoints and optimizer masks work on this flat dict: plain string keys survive any
serialiser, and a name says which layer and chain a tensor belongs to.
"""

from __future__ import annotations

import jax
from flax import nnx

Params = dict[str, jax.Array]


def param_name(path) -> str:
  """The flat name of a leaf from its pytree path (an nnx.State's or a params dict's)."""
  parts = []
  for p in path:
    key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", None)))
    if key == "value" and isinstance(p, jax.tree_util.GetAttrKey):
      continue
    parts.append(str(key))
  return ".".join(parts)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, Params, jax.tree_util.PyTreeDef]:
  """-> (graphdef, flat params, treedef of the nnx.State) for `merge_params`."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  return graphdef, {param_name(p): x for p, x in leaves}, treedef


def merge_params(graphdef: nnx.GraphDef, treedef: jax.tree_util.PyTreeDef, params: Params,
                 names: list[str]) -> nnx.Module:
  """Rebuilds the module from flat params (`names` in the order split_params returned)."""
  state = jax.tree_util.tree_unflatten(treedef, [params[n] for n in names])
  return nnx.merge(graphdef, state)


class ParamCodec:
  """Remembers a model's structure so flat params can be turned back into the module (in jit)."""

  def __init__(self, model: nnx.Module):
    self.graphdef, params, self.treedef = split_params(model)
    self.names = list(params)

  def params(self, model: nnx.Module) -> Params:
    return split_params(model)[1]

  def merge(self, params: Params) -> nnx.Module:
    missing = [n for n in self.names if n not in params]
    if missing:
      raise KeyError(f"parameters missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return merge_params(self.graphdef, self.treedef, params, self.names)
