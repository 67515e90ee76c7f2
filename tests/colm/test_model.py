"""The chain-aware decoder: LLaMA equivalence at chains=(1,), chain causality, nesting, config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.config import ModelConfig
from colm.layers import cumsum
from colm.model import Block, Decoder

# chains (1, 2, 1): D (11, 22, 11), heads (2, 4, 2), KV heads (1, 2, 1), FFN (13, 26, 13).
CFG_121 = dict(chains=(1, 2, 1), d_model=44, n_heads=8, n_kv_heads=4, head_dim=10, ffn_dim=52)
# chains (1, 1): D (23, 23), heads (3, 3), KV heads (1, 1), FFN (31, 31).
CFG_11 = dict(chains=(1, 1), d_model=46, n_heads=6, n_kv_heads=2, head_dim=6, ffn_dim=62)


def random_module(ctor, seed: int):
  """ctor() built abstractly, every parameter (norm scales included) drawn with NumPy: eager
  init and jax.random would compile kernels per parameter shape, which dominates test time."""
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = []
  for x in leaves:
    if x.ndim == 1:  # norm scale
      new.append(1.0 + 0.5 * rng.standard_normal(x.shape))
    else:  # fan-in scaled so activations stay O(1) and logits spread out
      new.append(rng.standard_normal(x.shape) * (1.5 / np.sqrt(x.shape[0])))
  new = [jnp.asarray(y, x.dtype) for x, y in zip(leaves, new)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


def make_model(seed: int, **kw) -> Decoder:
  cfg = ModelConfig.tiny(**kw)
  return random_module(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), seed)


def tokens_for(cfg: ModelConfig, seed: int, shape) -> jax.Array:
  """Random ids; the chain tests all use shape (2, 9) so they share compiled forwards."""
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, jnp.int32)


@functools.cache
def _jitted(graphdef, num_chains):
  def f(state, tokens):
    model = nnx.merge(graphdef, state)
    return model.hidden(tokens, num_chains=num_chains), model(tokens, num_chains=num_chains)
  return jax.jit(f)


def run(model: Decoder, tokens, method: str = "__call__", num_chains=None, state=None):
  """model.hidden or model.__call__ (tokens, num_chains=...): both come from one compiled
  function per (graph, k), since XLA compiles dominate the run time."""
  graphdef, st = nnx.split(model)
  hidden, logits = _jitted(graphdef, num_chains)(st if state is None else state, tokens)
  return np.asarray(hidden if method == "hidden" else logits)


# --- 1. chains=(1,) equals an independent float64 NumPy LLaMA --------------------------------


def _np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, theta):
  """x [B, T, N, E] at positions 0..T-1, rotate-half form."""
  t, e = x.shape[1], x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, e, 2, dtype=np.float64) / e)
  ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]  # [T, E/2]
  cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_llama(w: dict, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
  b, t = tokens.shape
  e, nh, nk = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
  x = w["embed"][tokens]
  causal = np.tril(np.ones((t, t), bool))
  for lw in w["layers"]:
    h = _np_rms(x, lw["attn_norm"], cfg.norm_eps)
    q = _np_rope((h @ lw["q"]).reshape(b, t, nh, e), cfg.rope_theta)
    k = _np_rope((h @ lw["k"]).reshape(b, t, nk, e), cfg.rope_theta)
    v = (h @ lw["v"]).reshape(b, t, nk, e)
    out = np.zeros((b, t, nh, e))
    for head in range(nh):
      kv = head // (nh // nk)  # consecutive query heads share a KV head
      s = np.einsum("bte,bse->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(e)
      s = np.where(causal, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[:, :, head] = np.einsum("bts,bse->bte", p, v[:, :, kv])
    x = x + out.reshape(b, t, nh * e) @ lw["o"]
    h = _np_rms(x, lw["ffn_norm"], cfg.norm_eps)
    g = h @ lw["gate"]
    x = x + (g / (1.0 + np.exp(-g)) * (h @ lw["up"])) @ lw["down"]
  h = _np_rms(x, w["final_norm"], cfg.norm_eps)
  head = w["embed"].T if cfg.tie_embeddings else w["head"]
  return h @ head


def _np_weights(model: Decoder) -> dict:
  f = lambda p: np.asarray(p[...], np.float64)
  layers = []
  for layer in model.layers:
    a, m = layer.attn, layer.ffn
    for lin in (a.q, a.k, a.v, a.o, m.gate, m.up, m.down):
      assert len(lin.kernels) == 1
    layers.append(dict(
        attn_norm=f(layer.attn_norm.scale), ffn_norm=f(layer.ffn_norm.scale),
        q=f(a.q.kernels[0]), k=f(a.k.kernels[0]), v=f(a.v.kernels[0]), o=f(a.o.kernels[0]),
        gate=f(m.gate.kernels[0]), up=f(m.up.kernels[0]), down=f(m.down.kernels[0])))
  w = dict(embed=f(model.embed), final_norm=f(model.final_norm.scale), layers=layers)
  if model.head is not None:
    w["head"] = f(model.head)
  return w


@pytest.mark.parametrize(
    "tie, kw, seed",
    [
        (True, dict(n_heads=6, n_kv_heads=2, head_dim=8, d_model=45, ffn_dim=37), 0),  # GQA 3:1
        (False, dict(n_heads=4, n_kv_heads=2, head_dim=10, d_model=39, ffn_dim=53), 1),  # GQA 2:1
        (False, dict(n_heads=4, n_kv_heads=1, head_dim=6, d_model=31, rope_theta=500.0), 3),  # MQA
    ],
)
def test_single_chain_equals_numpy_llama(tie, kw, seed):
  model = make_model(seed, tie_embeddings=tie, **kw)
  cfg = model.cfg
  assert (model.head is None) == tie
  tokens = tokens_for(cfg, seed + 50, (2, 11))
  got = run(model, tokens)
  ref = _np_llama(_np_weights(model), cfg, np.asarray(tokens))
  assert got.shape == (2, 11, cfg.vocab_size) and got.dtype == np.float32
  err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
  assert err < 1e-5, err
  assert np.std(ref) > 0.3  # the comparison is not between near-zero logits


# --- 3. whole-model chain causality and nesting ------------------------------------------------


def _perturb_chains_from(model: Decoder, j: int, seed: int):
  """Params with everything owned by chains >= j (0-based) redrawn: kernels of output chains
  >= j, norm-scale and embedding columns of those chains, head rows of those chains."""
  start = cumsum(model.cfg.chain_dims)[j - 1]
  rng = np.random.default_rng(seed)

  def f(path, x):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    x = np.array(x)
    if "kernels" in names:
      if names[names.index("kernels") + 1] >= j:
        x += rng.standard_normal(x.shape)
    elif names[0] == "embed" or "scale" in names:
      x[..., start:] += rng.standard_normal(x[..., start:].shape)
    elif names[0] == "head":
      x[start:] += rng.standard_normal(x[start:].shape)
    else:
      raise AssertionError(f"unexpected parameter {names}")
    return jnp.asarray(x)

  return jax.tree_util.tree_map_with_path(f, nnx.state(model, nnx.Param))


@pytest.mark.parametrize("kw, tie, seed", [(CFG_11, True, 3), (CFG_121, False, 4)])
def test_later_chains_do_not_affect_earlier_hidden(kw, tie, seed):
  model = make_model(seed, tie_embeddings=tie, **kw)
  cfg = model.cfg
  tokens = tokens_for(cfg, seed + 7, (2, 9))
  base = run(model, tokens, "hidden", state=nnx.state(model))
  bounds = cumsum(cfg.chain_dims)
  for j in range(1, cfg.num_chains):
    got = run(model, tokens, "hidden", state=_perturb_chains_from(model, j, seed + j))
    np.testing.assert_array_equal(got[..., : bounds[j - 1]], base[..., : bounds[j - 1]])
    assert np.all(got[..., bounds[j - 1]:] != base[..., bounds[j - 1]:])  # the perturbation bites


@pytest.mark.parametrize("kw, seed", [(CFG_121, 6)])
def test_block_jacobian_is_chain_causal(kw, seed):
  """d block(x)[chain i] / d x[chain j] == 0 for j > i at every pair of positions."""
  cfg = ModelConfig.tiny(**kw)
  block = random_module(lambda: Block(cfg, rngs=nnx.Rngs(0)), seed)
  t, d = 4, cfg.d_model
  x = jax.random.normal(jax.random.key(seed), (1, t, d))
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  jac = jax.jit(jax.jacobian(lambda v: block(v, pos, cfg.num_chains)[0]))(x)
  jac = np.asarray(jac).reshape(t, d, t, d)  # [t_out, d_out, t_in, d_in]
  b = (0,) + cumsum(cfg.chain_dims)
  for i in range(cfg.num_chains):
    for j in range(cfg.num_chains):
      block_ij = jac[:, b[i]:b[i + 1], :, b[j]:b[j + 1]]
      if j > i:
        assert np.all(block_ij == 0.0), (i, j)
      else:
        assert np.any(block_ij != 0.0), (i, j)
  # Causal in time as well: no output position reads a later input position.
  for s in range(t):
    assert np.all(jac[s, :, s + 1:] == 0.0)


@pytest.mark.parametrize("kw, tie, seed", [(CFG_11, True, 7), (CFG_121, False, 8)])
def test_k_chain_hidden_is_prefix_of_full(kw, tie, seed):
  model = make_model(seed, tie_embeddings=tie, **kw)
  cfg = model.cfg
  tokens = tokens_for(cfg, seed + 3, (2, 9))
  full = run(model, tokens, "hidden")
  bounds = cumsum(cfg.chain_dims)
  for k in range(1, cfg.num_chains):
    part = run(model, tokens, "hidden", num_chains=k)
    assert part.shape == (2, 9, bounds[k - 1])
    np.testing.assert_allclose(part, full[..., : bounds[k - 1]], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_chains"):
    model(tokens, num_chains=cfg.num_chains + 1)
  with pytest.raises(ValueError, match="num_chains"):
    model(tokens, num_chains=0)


@pytest.mark.parametrize("kw, tie, k, seed", [(CFG_121, False, 2, 9), (CFG_11, True, 1, 10)])
def test_k_chain_logits_equal_standalone_model(kw, tie, k, seed):
  """Logits of the k-chain sub-model equal those of a model built with only those k chains."""
  big = make_model(seed, tie_embeddings=tie, **kw)
  cfg = big.cfg
  width = cumsum(cfg.chain_dims)[k - 1]
  small_cfg = cfg.replace(
      chains=cfg.chains[:k], d_model=width, n_heads=sum(cfg.chain_heads[:k]),
      n_kv_heads=sum(cfg.chain_kv_heads[:k]), ffn_dim=sum(cfg.chain_ffn[:k]))
  small = nnx.eval_shape(lambda: Decoder(small_cfg, rngs=nnx.Rngs(0)))
  big_state = nnx.state(big, nnx.Param)

  def copy(path, x):
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    src = big_state
    for n in names[:-1]:
      src = src[n]
    src = src[...]
    if names[0] == "embed" or "scale" in names:
      return src[..., :width]
    if names[0] == "head":
      return src[:width]
    assert src.shape == x.shape
    return src

  graphdef, abstract = nnx.split(small)
  small = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(copy, abstract))
  tokens = tokens_for(cfg, seed + 2, (2, 9))
  np.testing.assert_allclose(run(big, tokens, num_chains=k), run(small, tokens),
                             rtol=1e-5, atol=1e-5)
  assert big.cfg.num_params(k) == small_cfg.num_params()
  n_small = sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param)))
  assert small_cfg.num_params() == n_small


@pytest.mark.parametrize("kw", [{}, CFG_11, CFG_121, dict(tie_embeddings=False, **CFG_121)])
def test_num_params_counts_the_parameters(kw):
  model = nnx.eval_shape(lambda: Decoder(ModelConfig.tiny(**kw), rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert model.cfg.num_params() == n


# --- 4. configuration errors name the offending field ------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(chains=(1, 2), d_model=47), "d_model"),
        (dict(chains=(1, 2), d_model=48, n_heads=4, n_kv_heads=2), "n_heads"),
        (dict(chains=(1, 2), d_model=48, n_heads=6, n_kv_heads=2), "n_kv_heads"),
        (dict(chains=(1, 2), d_model=48, n_heads=6, n_kv_heads=3, ffn_dim=80), "ffn_dim"),
        (dict(chains=()), "chains"),
        (dict(chains=(1, 0)), "chains"),
        (dict(chains=(2, -1)), "chains"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(attn_impl="flash9000"), "attn_impl"),
        (dict(dtype="float13"), "dtype"),
        (dict(param_dtype="int4"), "param_dtype"),
        (dict(head_dim=7), "head_dim"),
        (dict(d_model=0), "d_model"),
        (dict(n_layers=-1), "n_layers"),
    ],
)
def test_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    ModelConfig.tiny(**kw)


def test_config_valid_splits():
  cfg = ModelConfig.tiny(**CFG_121)
  assert cfg.chain_dims == (11, 22, 11) and cfg.chain_heads == (2, 4, 2)
  assert cfg.chain_kv_heads == (1, 2, 1) and cfg.chain_ffn == (13, 26, 13)
  with pytest.raises(ValueError, match="preset"):
    ModelConfig.preset("huge")
  with pytest.raises(ValueError, match="attn_impls"):
    nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), attn_impls=("reference",)))


@pytest.mark.parametrize("dtype,impl", [(jnp.float32, "xla"), (jnp.bfloat16, "cudnn"),
                                        (jnp.float16, "cudnn")])
def test_auto_attention_picks_cudnn_only_for_16_bit_on_gpu(monkeypatch, dtype, impl):
  """On GPU, 'auto' sends fp16/bf16 to cuDNN and float32 (which cuDNN rejects) to XLA."""
  from colm import attention
  seen = {}

  def fake_dpa(q, k, v, *, is_causal, scale, implementation):
    seen["impl"] = implementation
    return q

  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", fake_dpa)
  q = jnp.zeros((1, 4, 2, 8), dtype)
  attention.get_attention("auto")(q, q, q, causal=True)
  assert seen["impl"] == impl
