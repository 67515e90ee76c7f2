"""colm.mesh: the (data, fsdp, tensor) mesh, a rule for every parameter, and sharded forward,
prefill and decode (plain, CoLM chains, S2 heads) equal to one device on 8 simulated devices."""

from __future__ import annotations

import textwrap

import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from colm.config import ModelConfig
from colm.mesh import logical_spec, make_mesh, param_spec, tree_shardings
from colm.model import Decoder
from colm.params import split_params


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
  return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("kw", [
    dict(), dict(chains=(1, 1)), dict(chains=(1, 1), air=True),
    dict(chains=(1, 1), tie_embeddings=False, separate_heads=True), dict(tie_embeddings=False),
])
def test_every_parameter_has_a_rule(kw):
  model = nnx.eval_shape(lambda: Decoder(ModelConfig.tiny(**kw), rngs=nnx.Rngs(0)))
  params = split_params(model)[1]
  mesh = abstract_mesh(2, 2, 2)
  for name, x in params.items():
    spec = param_spec(name, x.shape, mesh)
    assert len(spec) == x.ndim, name
    for dim, s in zip(x.shape, spec):  # every sharded dim is divisible by its axes
      n = 1 if s is None else 2 ** (1 if isinstance(s, str) else len(s))
      assert dim % n == 0, (name, x.shape, spec)


def test_megatron_pairs_and_fsdp():
  """Column-parallel q, k, v, gate, up split their outputs over tensor; row-parallel o, down
  their inputs; fsdp takes the model width; norms stay whole; tensor=1 shards nothing there."""
  mesh = abstract_mesh(1, 2, 2)
  d = 48
  assert param_spec("layers.0.attn.q.kernels.0", (d, 48), mesh) == P("fsdp", "tensor")
  assert param_spec("layers.1.attn.k.kernels.0", (d, 24), mesh) == P("fsdp", "tensor")
  assert param_spec("layers.0.attn.o.kernels.0", (48, d), mesh) == P("tensor", "fsdp")
  assert param_spec("layers.0.ffn.gate.kernels.0", (d, 80), mesh) == P("fsdp", "tensor")
  assert param_spec("layers.0.ffn.down.kernels.0", (80, d), mesh) == P("tensor", "fsdp")
  assert param_spec("embed", (320, d), mesh) == P("tensor", "fsdp")
  assert param_spec("layers.0.attn_norm.scale", (d,), mesh) == P(None)
  # A chain's width 25 that fsdp does not divide: fsdp moves to the other dim, tensor stays.
  assert param_spec("layers.0.ffn.gate.kernels.1", (25, 80), mesh) == P(None, "tensor")
  assert param_spec("layers.0.attn.q.kernels.1", (25, 24), abstract_mesh(1, 2, 1)) == \
      P(None, "fsdp")
  # Activations and the batch: batch over (data, fsdp) where divisible, else what divides.
  assert logical_spec(("batch", "seq", "heads", "head_dim"), (8, 5, 4, 12),
                      abstract_mesh(2, 2, 2)) == P(("data", "fsdp"), None, "tensor", None)
  assert logical_spec(("batch", "seq"), (2, 5), abstract_mesh(2, 2, 1)) == P("data", None)
  assert logical_spec(("batch", "kv_heads"), (3, 3), abstract_mesh(2, 1, 2)) == P(None, None)


def test_unknown_parameters_and_bad_meshes_raise():
  with pytest.raises(ValueError, match="no sharding rule for parameter 'layers.0.gizmo'"):
    param_spec("layers.0.gizmo", (4, 4), abstract_mesh(1, 1, 1))
  with pytest.raises(ValueError, match="no sharding rule"):
    import jax.numpy as jnp
    tree_shardings({"mystery": jnp.zeros((2, 2))}, make_mesh())
  with pytest.raises(ValueError, match="data=3 x fsdp=1 x tensor=1 != 1 devices"):
    make_mesh(3)
  with pytest.raises(ValueError, match="does not divide"):
    make_mesh(-1, 1, 2)


SHARDED = textwrap.dedent("""
    import contextlib
    import time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from flax import nnx
    from colm.config import ModelConfig
    from colm.mesh import cache_shardings, make_mesh, tree_shardings
    from colm.model import Decoder
    from colm.params import param_name
    from kvcache import decode_loop, init_cache, prefill, SamplingConfig
    assert jax.device_count() == 8
    SEED = 0
    print("seed", SEED)
    T0 = time.time()
    rng = np.random.default_rng(SEED)
    TOL = 1e-5  # float32; sharding only reorders sums

    def spread(model):  # weights large enough that logits differ by far more than TOL
      g, s = nnx.split(model)
      s = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * (
          0.5 if x.ndim == 1 else 1.5 / np.sqrt(x.shape[0])) + (x.ndim == 1), x.dtype), s)
      return g, s

    def place(state, mesh):
      return jax.device_put(state, tree_shardings(state, mesh))

    # 1. The k-chain logits of a CoLM model (and the Air variant) under two meshes.
    for kw, shape in ((dict(chains=(1, 1)), (2, 2, 2)), (dict(chains=(1, 1), air=True), (4, 1, 2))):
      cfg = ModelConfig.tiny(vocab_size=64, n_layers=1, **kw)
      g, s = spread(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
      tokens = jnp.asarray(rng.integers(0, 64, (8, 12)), jnp.int32)
      fwd = jax.jit(lambda s, t: [nnx.merge(g, s)(t, num_chains=k) for k in (1, 2)])
      want = [np.asarray(x) for x in fwd(s, tokens)]
      mesh = make_mesh(*shape)
      sp = place(s, mesh)
      q = {param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(sp)}[
          "layers.0.attn.q.kernels.1"]
      assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.size < q.size
      with jax.set_mesh(mesh):
        got = [np.asarray(x) for x in fwd(sp, tokens)]
      for k, (w, x) in enumerate(zip(want, got), 1):
        err = np.abs(x - w).max()
        assert err < TOL * np.abs(w).max(), (kw, shape, k, err)
      print("chains ok", kw, shape, time.time() - T0)

    # 2. Prefill + decode with sharded params and cache (data=4 x tensor=2).
    def infer(g, s, cfg, mesh):
      b, t, new = 4, 40, 6
      prompts = np.asarray(rng.integers(0, cfg.vocab_size, (b, t)), np.int32)
      lens = np.asarray([40, 29, 19, 35], np.int32)
      out = []
      for m in (None, mesh):
        cache = init_cache(cfg, b, 48, decode_attn="reference")
        params = s
        if m is not None:
          cache = jax.device_put(cache, cache_shardings(cache, m))
          params = place(s, m)
          k0 = cache.layers[0].groups[0].k
          assert k0.sharding.spec == P("data", "tensor", None, None), k0.sharding.spec
        with jax.set_mesh(m) if m is not None else contextlib.nullcontext():
          logits, cache = prefill(g, params, jnp.asarray(prompts), jnp.asarray(lens), cache)
          first = jnp.argmax(logits[jnp.arange(b), lens - 1], -1).astype(jnp.int32)
          toks, _, cache, step_logits = decode_loop(
              g, params, first, cache, jax.random.key(0), jnp.zeros((0,), jnp.int32),
              max_new_tokens=new, sampling=SamplingConfig(), return_logits=True)
        out.append((np.asarray(logits), np.asarray(step_logits), np.asarray(toks), cache))
      (l1, d1, t1, c1), (l8, d8, t8, c8) = out
      scale = np.abs(l1).max()
      valid = np.arange(t)[None] < lens[:, None]
      assert np.abs(l1 - l8)[valid].max() < TOL * scale, np.abs(l1 - l8)[valid].max()
      assert np.abs(d1 - d8).max() < TOL * scale, np.abs(d1 - d8).max()
      np.testing.assert_array_equal(t1, t8)
      for a, b_ in zip(jax.tree.leaves(c1), jax.tree.leaves(c8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-4)
      return c8

    mesh = make_mesh(4, 1, 2)
    # S2: each head reads its own strided blocks (its token mask); sharding splits by head.
    for spec in ("s2:block_size=16,local_blocks=1,vert_stride=2",):
      cfg = ModelConfig.tiny(vocab_size=64, n_layers=1, chains=(1, 1), attn_impl=spec)
      g, s = spread(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
      c8 = infer(g, s, cfg, mesh)
      print("inference ok", spec, c8.layers[0].groups[0].k.sharding.spec, time.time() - T0)
    print("OK")
""")


def test_sharded_forward_prefill_and_decode_equal_one_device(cpu_devices):
  out = cpu_devices(SHARDED)
  assert "OK" in out, out
