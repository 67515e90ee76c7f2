"""The device mesh (data, fsdp, tensor) and the logical-axis sharding rules that training and
inference share: for every parameter, the activations the model constrains, and the KV cache.

Mesh axes: `data` and `fsdp` both split the batch; `fsdp` also shards parameters and optimizer
moments (ZeRO-3); `tensor` splits attention heads, the FFN width and the vocabulary,
Megatron-style: q, k, v, gate and up are column-parallel (their output features split), o and
down row-parallel (their input features split), so each pair costs one all-reduce. One device is
the trivial mesh. A ChainLinear holds one kernel per chain, W_i [D_<=i, out_i]; each kernel is
sharded on its own by the same rule.

Every tensor dim carries a logical name (PARAM_AXES, CACHE_AXES, the `constrain` calls in
colm/model.py) and RULES maps the name to mesh axes. A dim that its mesh axes do not divide
stays whole on them (replicated there), so any configuration runs on any mesh. Sharding changes
where the numbers live, never which numbers are computed (GSPMD), so chain causality and the
nested sub-models survive it: tests/colm/test_mesh.py checks the k-chain logits.

    mesh = make_mesh(data=4, tensor=2)
    params = jax.device_put(params, tree_shardings(params, mesh))
    with jax.set_mesh(mesh):  # the model's activation constraints see the mesh
      logits = jax.jit(fn)(params, tokens)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from colm.params import param_name

AXES = ("data", "fsdp", "tensor")
# Logical name -> mesh axes, outermost first. Names absent here are never sharded: seq,
# hidden (an activation's model width), head_dim, slots, norm.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # sequences: data parallel, and FSDP is data parallel too
    "embed": ("fsdp",),  # a parameter's model-width dim: ZeRO-3 shards it
    "heads": ("tensor",),  # query heads (times head dim in a kernel)
    "kv_heads": ("tensor",),  # KV heads (cache head groups too)
    "ffn": ("tensor",),  # SwiGLU hidden width
    "vocab": ("tensor",),  # embedding rows, LM head columns, logits
}
# Parameter name (colm.params) -> logical axes of its dims; the first full match wins.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed", ("vocab", "embed")),  # [V, D]
    (r"head|heads\.\d+", ("embed", "vocab")),  # [D_<=j, V]
    (r".*\.attn\.q\.kernels\.\d+", ("embed", "heads")),  # column-parallel [D_<=i, H_i E]
    (r".*\.attn\.[kv]\.kernels\.\d+", ("embed", "kv_heads")),  # column-parallel [D_<=i, K_i E]
    (r".*\.attn\.o\.kernels\.\d+", ("heads", "embed")),  # row-parallel [H_<=i E, D_i]
    (r".*\.ffn\.(gate|up)\.kernels\.\d+", ("embed", "ffn")),  # column-parallel [D_<=i, F_i]
    (r".*\.ffn\.down\.kernels\.\d+", ("ffn", "embed")),  # row-parallel [F_<=i, D_i]
    (r"(.*\.)?\w*norm\.scale", ("norm",)),  # [D], replicated: tiny
    (r".*\.attn\.[qkv]_bias", ("norm",)),  # [H E] / [K E] (Qwen's q/k/v bias), replicated: tiny
)
# KV cache leaf (kvcache.cache field name) -> logical axes: batch over data, head groups' KV
# heads over tensor (the heads a device's query heads read, so attention stays local).
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("batch", "kv_heads", "slots", "head_dim"),  # [B, Kg, N, E]
    "v": ("batch", "kv_heads", "slots", "head_dim"),  # [B, Kg, N, E]
    "pos": ("batch", "kv_heads", "slots"),  # [B, Kg, N]
    "lengths": ("batch",),  # [B]
}
MeshLike = Mesh | jax.sharding.AbstractMesh


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; data=-1 takes the devices fsdp and tensor leave.

  Devices are laid out in jax.devices() order, tensor innermost: with several processes
  (hosts) each host's devices are consecutive, so tensor groups stay within a host and the
  data axis crosses hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if size < 1:
      raise ValueError(f"mesh {name}={size} must be >= 1")
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} devices")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {n} devices")
  return Mesh(np.array(devices).reshape(data, fsdp, tensor), AXES)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: MeshLike,
                 rules: dict[str, tuple[str, ...]] = RULES) -> P:
  """The PartitionSpec of a tensor whose dims have these logical names.

  A dim gets the mesh axes its name maps to, minus axes of size 1, axes an earlier dim took,
  and trailing axes until their product divides the dim (a dim nothing divides is replicated).
  """
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  sizes = dict(mesh.shape)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    got = [a for a in rules.get(name, ()) if sizes.get(a, 1) > 1 and a not in used]
    while got and dim % math.prod(sizes[a] for a in got):
      got.pop()
    used.update(got)
    spec.append(None if not got else got[0] if len(got) == 1 else tuple(got))
  return P(*spec)


def param_axes(name: str) -> tuple[str, ...]:
  """Logical axes of the named parameter; a ValueError for a parameter no rule covers."""
  for pattern, axes in PARAM_AXES:
    if re.fullmatch(pattern, name):
      return axes
  raise ValueError(f"no sharding rule for parameter {name!r}: add it to colm.mesh.PARAM_AXES")


def param_spec(name: str, shape: Sequence[int], mesh: MeshLike) -> P:
  """A parameter's spec: RULES on its logical axes; where fsdp > 1 found no home (a chain's
  width D_<=i that fsdp does not divide), fsdp takes the largest free dim it divides, so FSDP
  still shards what it can."""
  axes = param_axes(name)
  if len(axes) != len(shape):
    raise ValueError(f"parameter {name!r} of shape {tuple(shape)} expects dims {axes}")
  spec = list(logical_spec(axes, shape, mesh))
  f = dict(mesh.shape).get("fsdp", 1)
  taken = {a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)}
  if f > 1 and "fsdp" not in taken and len(shape) > 1:
    for ax in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if spec[ax] is None and shape[ax] % f == 0:
        spec[ax] = "fsdp"
        break
  return P(*spec)


def param_sharding(name: str, x: Any, mesh: Mesh) -> NamedSharding:
  """The NamedSharding of parameter `name` (x: an array or ShapeDtypeStruct)."""
  return NamedSharding(mesh, param_spec(name, x.shape, mesh))


def _leaf_name(path) -> str | None:
  """The parameter name a leaf sits under: its full path (an nnx.State, a params dict), else
  the last dict key (an optimizer moment, keyed like the params)."""
  name = param_name(path)
  if any(re.fullmatch(p, name) for p, _ in PARAM_AXES):
    return name
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys and any(re.fullmatch(p, str(keys[-1])) for p, _ in PARAM_AXES) \
      else None


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for params (a flat dict or an nnx.State) or an optimizer state holding them.

  Leaves under a parameter name get that parameter's sharding (moments mirror their params);
  scalars (step counts) are replicated; any other array is a ValueError (give it a rule).
  """
  def one(path, x):
    name = _leaf_name(path)
    if name is not None and len(param_axes(name)) == len(x.shape):
      return param_sharding(name, x, mesh)
    if not x.shape:
      return NamedSharding(mesh, P())
    raise ValueError(f"no sharding rule for {jax.tree_util.keystr(path)} of shape {x.shape}")
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Token batches [B, ...]: B over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
  """NamedShardings for a kvcache.KVCache (any pytree whose leaves are its fields): k, v [B, Kg,
  N, E] and pos [B, Kg, N] with B over data and a head group's Kg over tensor where they
  divide; lengths [B] with the batch; anything else replicated."""
  def one(path, x):
    last = path[-1] if path else None
    axes = CACHE_AXES.get(getattr(last, "name", None))
    if axes is None or len(axes) != len(x.shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_spec(axes, x.shape, mesh))
  return jax.tree_util.tree_map_with_path(one, cache)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """x with the sharding its logical axes give under the mesh set by jax.set_mesh; unchanged
  without one (or on a mesh whose axes are all 1), so one-device code pays nothing."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names) or \
      all(dict(mesh.shape)[a] == 1 for a in AXES):
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh))
