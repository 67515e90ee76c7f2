"""S2 attention as the decoder's attention function: equals masked attention (jnp reference and
the Pallas kernel in interpret mode), is selected by spec, and a hybrid S2/dense decoder trains
a step and decodes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.attention import get_attention
from colm.config import ModelConfig
from colm.model import Decoder
from kvcache import generate
from pallas_kernels import block_sparse_attention_reference
from s2attn import S2Pattern, hybrid_layer_attn, s2_attention, s2_compression, s2_spec


def qkv(seed, b, t, h, kh, e):
  """Random float32 q [B, T, H, E], k and v [B, T, K, E] (NumPy: no compile per shape)."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, t, h, e), (b, t, kh, e), (b, t, kh, e)))


# T = 83 is not a multiple of the block size: the last block is partial (padded inside).
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("pattern", [S2Pattern(16, 2, 3), S2Pattern(32, 1, 4, num_dense_heads=3,
                                                                    head_sliding_offset=1)])
def test_reference_path_equals_masked_attention(pattern, per_kv_head):
  q, k, v = qkv(0, 2, 83, 6, 2, 8)
  lay = pattern.layout(6, 83, 2 if per_kv_head else None)
  want = jax.jit(block_sparse_attention_reference, static_argnames="block_size")(
      q, k, v, lay, block_size=pattern.block_size)
  got = jax.jit(lambda q, k, v: s2_attention(q, k, v, pattern=pattern, per_kv_head=per_kv_head,
                                             impl="reference"))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_kernel_in_interpret_mode_equals_reference(per_kv_head):
  """The Pallas path gets the layout (per KV head: one row per KV head); gradients of the kernel
  itself are tested in tests/pallas_kernels."""
  pattern = S2Pattern(16, 1, 3)
  q, k, v = qkv(1, 1, 40, 4, 2, 8)

  def run(impl):
    return jax.jit(lambda q, k, v: s2_attention(q, k, v, pattern=pattern,
                                                per_kv_head=per_kv_head, impl=impl))(q, k, v)

  np.testing.assert_allclose(run("interpret"), run("reference"), atol=1e-5)


def test_queries_at_an_offset_see_the_pattern_of_their_positions():
  """T < S (a chunk of queries at the end): rows equal the last rows of the full call."""
  attn = jax.jit(lambda q, k, v: s2_attention(q, k, v, pattern=S2Pattern(16, 2, 4)))
  q, k, v = qkv(2, 1, 70, 4, 4, 8)
  full = attn(q, k, v)
  part = attn(q[:, 50:], k, v)
  np.testing.assert_allclose(part, full[:, 50:], atol=1e-6)


def test_spec_selects_s2_and_rejects_bad_options():
  fn = get_attention("s2:block_size=16,local_blocks=2,vert_stride=4,impl=reference")
  assert fn.keywords["pattern"] == S2Pattern(16, 2, 4) and fn.keywords["impl"] == "reference"
  q, k, v = qkv(3, 1, 32, 2, 1, 4)
  with pytest.raises(ValueError, match="unknown option"):
    get_attention("s2:vert_strid=4")
  with pytest.raises(ValueError, match="block_size"):
    get_attention("s2:block_size=24")
  with pytest.raises(ValueError, match="impl"):
    get_attention("s2:impl=fast")
  with pytest.raises(ValueError, match="causal"):
    fn(q, k, v, causal=False)
  cover = get_attention("s2:block_size=16,vert_stride=8,require_coverage=true")
  with pytest.raises(ValueError, match="require_coverage"):
    cover(*qkv(4, 1, 32, 4, 4, 4))  # 4 heads, stride 8: half the residues


def test_hybrid_decoder_trains_a_step_and_decodes():
  s2 = s2_spec(S2Pattern(16, 1, 4), impl="reference")
  layers = hybrid_layer_attn(2, s2, dense="reference", dense_layers=[1])
  assert layers == (s2, "reference")
  cfg = ModelConfig.tiny(n_layers=2, max_seq_len=96, layer_attn=layers)
  model = nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))()
  batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 81)), jnp.int32)

  def loss_fn(m):
    logits = m(batch[:, :-1])
    return jnp.mean(jax.nn.logsumexp(logits, -1)
                    - jnp.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0])

  @nnx.jit
  def step(m):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(m, nnx.Param), grads))
    return loss

  l0 = float(step(model))
  l1 = float(step(model))
  assert np.isfinite(l0) and l1 < l0
  prompts = [[5, 6, 7] * 7, [9] * 40]
  out = np.asarray(generate(model, prompts, max_new_tokens=12, compression=s2_compression(cfg)))
  assert out.shape == (2, 12) and (out >= 0).all() and (out < cfg.vocab_size).all()


def test_kvcache_decode_of_s2_model_matches_full_forward():
  """The generic decoder's cache path applies each S2 head's pattern at decode time."""
  from kvcache import decode_step, init_cache, prefill

  spec = "s2:block_size=16,local_blocks=1,vert_stride=2"
  cfg = ModelConfig.tiny(layer_attn=(spec, "reference"), max_seq_len=96)
  seed = int(np.random.randint(1 << 30))
  print(f"seed={seed}")
  model = Decoder(cfg, rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.key(seed + 1), (2, 72), 0, 97)
  full = model(tokens)
  graphdef, params = nnx.split(model)
  cache = init_cache(cfg, 2, 96)
  logits, cache = prefill(graphdef, params, tokens[:, :40], jnp.array([40, 40]), cache)
  np.testing.assert_allclose(logits, full[:, :40], atol=2e-5)
  for t in range(40, 72):
    step, cache = decode_step(graphdef, params, tokens[:, t], cache)
    np.testing.assert_allclose(step, full[:, t], atol=2e-5, err_msg=f"position {t}")
