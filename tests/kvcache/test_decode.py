"""Cached prefill / decode against the full forward, batched ragged generation, generate's contract.

Models are built abstractly with NumPy weights scaled so logits spread out (greedy choices are
then far from ties); eager init would compile a kernel per parameter shape.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.attention import reference_attention, register_attention
from colm.config import ModelConfig
from colm.model import Decoder
from kvcache import (
  Compression,
  SamplingConfig,
  decode_step,
  generate,
  init_cache,
  map_positions,
  prefill,
)

# Plain Transformer, GQA 3:1, tied head.
CFG_1 = dict(d_model=45, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=53, max_seq_len=40)
# chains (1, 2, 1): D (11, 22, 11), heads (2, 4, 2), KV heads (1, 2, 1), FFN (13, 26, 13).
CFG_121 = dict(chains=(1, 2, 1), d_model=44, n_heads=8, n_kv_heads=4, head_dim=10, ffn_dim=52,
               tie_embeddings=False, max_seq_len=40)


@functools.cache
def make_model(seed: int, **kw) -> Decoder:
  cfg = ModelConfig.tiny(**kw)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [1.0 + 0.5 * rng.standard_normal(x.shape) if x.ndim == 1
         else rng.standard_normal(x.shape) * (1.5 / np.sqrt(x.shape[0])) for x in leaves]
  new = [jnp.asarray(y, x.dtype) for x, y in zip(leaves, new)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


@functools.cache
def _forward_fn(graphdef, num_chains):
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, num_chains=num_chains))


def forward(model, tokens, num_chains=None) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_forward_fn(graphdef, num_chains)(state, tokens))


def random_tokens(seed: int, shape, vocab: int) -> np.ndarray:
  return np.array(jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32))


def _assert_close(got, want, what):
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < 1e-5, (what, err)


@pytest.mark.parametrize("kw, num_chains, seed", [(CFG_1, None, 0), (CFG_121, None, 1),
                                                  (CFG_121, 2, 2)])
def test_prefill_and_decode_match_full_forward(kw, num_chains, seed):
  """Right-padded prompts of different lengths prefilled together, then decoded token by token:
  the logits at every position of every row equal the full causal forward of that row."""
  model = make_model(seed, **kw)
  cfg = model.cfg
  lengths = np.array([3, 7, 5])
  total, pad_to, max_len = 12, 8, 16
  seqs = random_tokens(seed + 10, (3, total), cfg.vocab_size)
  full = forward(model, jnp.asarray(seqs), num_chains)  # [3, total, V]

  # Padding holds unrelated tokens: it must be ignored in prefill and overwritten when decoding.
  prompt = random_tokens(seed + 20, (3, pad_to), cfg.vocab_size)
  for b, n in enumerate(lengths):
    prompt[b, :n] = seqs[b, :n]
  graphdef, params = nnx.split(model)
  cache = init_cache(cfg, 3, max_len)
  logits, cache = prefill(graphdef, params, jnp.asarray(prompt), jnp.asarray(lengths), cache,
                          num_chains)
  assert logits.shape == (3, pad_to, cfg.vocab_size)
  np.testing.assert_array_equal(cache.lengths, lengths)
  for b, n in enumerate(lengths):
    _assert_close(np.asarray(logits[b, :n]), full[b, :n], f"prefill row {b}")

  steps = total - lengths.max()
  sizes = []
  for i in range(steps):
    pos = lengths + i
    token = jnp.asarray(seqs[np.arange(3), pos])
    step_logits, cache = decode_step(graphdef, params, token, cache, num_chains)
    sizes.append(decode_step._cache_size())
    assert step_logits.shape == (3, cfg.vocab_size)
    np.testing.assert_array_equal(cache.lengths, pos + 1)
    _assert_close(np.asarray(step_logits), full[np.arange(3), pos], f"decode step {i}")
  assert steps >= 4 and len(set(sizes)) == 1, f"decode_step recompiled: cache sizes {sizes}"


@pytest.fixture(scope="module")
def model_1():
  """generate's contract needs no depth (the cache across layers is tested above): one layer."""
  return make_model(3, **{**CFG_1, "n_layers": 1})


@pytest.fixture(scope="module")
def prompts(model_1):
  lens = (4, 11, 1)
  toks = random_tokens(30, (len(lens), max(lens)), model_1.cfg.vocab_size)
  return [toks[i, :n].tolist() for i, n in enumerate(lens)]


# Every greedy call passes one stop token, so they all share one compiled decode loop (the stop
# list's length is part of its shape); id vocab_size is never produced, so it never stops a row.
@pytest.fixture(scope="module")
def greedy_batch(model_1, prompts):
  return generate(model_1, prompts, max_new_tokens=8, pad_to=16,
                  stop_tokens=[model_1.cfg.vocab_size])


def test_ragged_batch_equals_each_prompt_alone(model_1, prompts, greedy_batch):
  assert [len(r) for r in greedy_batch] == [8, 8, 8]  # max_new_tokens honoured
  for p, row in zip(prompts, greedy_batch):
    alone = generate(model_1, [p], max_new_tokens=8, pad_to=16,
                     stop_tokens=[model_1.cfg.vocab_size])
    assert alone == [row]
  # Greedy decoding is the argmax of the full forward at every generated position.
  p, row = prompts[0], greedy_batch[0]
  logits = forward(model_1, jnp.asarray([p + row]))[0]
  assert np.argmax(logits[len(p) - 1: -1], axis=-1).tolist() == row


def test_stop_tokens_end_each_row(model_1, prompts, greedy_batch):
  row0 = greedy_batch[0]
  # A stop token first produced at index i >= 1 of row 0.
  i = next(i for i in range(1, 8) if row0[i] not in row0[:i])
  stop = row0[i]
  out = generate(model_1, prompts, max_new_tokens=8, pad_to=16, stop_tokens=[stop])
  assert out[0] == row0[: i + 1]
  for got, base in zip(out, greedy_batch):
    want = base[: base.index(stop) + 1] if stop in base else base
    assert got == want


def test_seeds(model_1, prompts):
  hot = SamplingConfig(temperature=1.0)
  a = generate(model_1, prompts, max_new_tokens=5, sampling=hot, seed=1, pad_to=16)
  b = generate(model_1, prompts, max_new_tokens=5, sampling=hot, seed=1, pad_to=16)
  c = generate(model_1, prompts, max_new_tokens=5, sampling=hot, seed=2, pad_to=16)
  assert a == b
  assert a != c
  assert [len(r) for r in a] == [5, 5, 5]
  assert all(0 <= t < model_1.cfg.vocab_size for r in a + c for t in r)


def test_generate_rejects_bad_requests(model_1):
  cfg = model_1.cfg
  with pytest.raises(ValueError, match="cache length"):
    generate(model_1, [[1] * (cfg.max_seq_len + 1)], max_new_tokens=1)
  with pytest.raises(ValueError, match="cache length"):  # the prompt fits, its continuation doesn't
    generate(model_1, [[1] * 10], max_new_tokens=8, max_len=16)
  with pytest.raises(ValueError, match="prompt"):
    generate(model_1, [[1, 2], []])
  with pytest.raises(ValueError, match="prompt"):
    generate(model_1, [])
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model_1, [[1, 2]], max_new_tokens=0)


@dataclasses.dataclass(frozen=True)
class _SinkAndWindow:
  """A toy StreamingLLM policy: keep the first `sink` positions and the last `recent`."""

  sink: int
  recent: int

  def __call__(self, cache, scores=None):
    t = cache.lengths[:, None, None]  # the next query's position
    return map_positions(cache, lambda li, h0, pos: jnp.where(
        (pos < self.sink) | (pos >= t - self.recent), pos, -1))


_WINDOW_MASK = {}


def _window_attention(q, k, v, *, causal=True, scale=None):
  m = _WINDOW_MASK["mask"][: q.shape[1], : k.shape[1]]
  return reference_attention(q, k, v, causal=causal, mask=jnp.asarray(m)[None, None], scale=scale)


register_attention("test_window", _window_attention)


def test_compression_hook_after_prefill_and_every_step(model_1, prompts, spread_decoder,
                                                       full_forward):
  """The hook's policy runs after prefill and after every decode step: greedy decoding with a
  sink + window policy equals the full forward under the same sink + window mask."""
  p = prompts[1]  # 11 tokens
  pol = _SinkAndWindow(sink=2, recent=5)
  toks, info = generate(model_1, [p], max_new_tokens=8, pad_to=16,
                        compression=Compression(pol, every=1), return_info=True)
  n = len(p) + 8
  t, s = np.arange(n)[:, None], np.arange(n)[None, :]
  _WINDOW_MASK["mask"] = (t < len(p)) | (s < 2) | (s >= t - 5)
  ref_model = spread_decoder(model_1.cfg.replace(attn_impl="test_window"), 3)
  ref = full_forward(ref_model, np.asarray([p + toks[0]]))[0]
  np.testing.assert_allclose(info["logits"][0], ref[len(p) - 1: n - 1], atol=1e-5, rtol=1e-5)
  assert np.argmax(ref[len(p) - 1: n - 1], -1).tolist() == toks[0]
  held = info["cache"].held_tokens()[0, 0, 0]
  assert held == 2 + 5  # sink + window, whatever ran past the last token
  _, plain = generate(model_1, [p], max_new_tokens=8, pad_to=16, return_info=True)
  assert np.abs(plain["logits"][0, 1:] - info["logits"][0, 1:]).max() > 1e-2  # it evicted


def test_suffixes_prefilled_after_the_prompt_equal_one_prompt(model_1, prompts, greedy_batch):
  """Query-agnostic generation without compression: prompt, then suffix onto the cache, is the
  prompt + suffix in one piece (the same greedy tokens)."""
  split = [max(1, len(p) // 2) for p in prompts]
  out = generate(model_1, [p[:s] for p, s in zip(prompts, split)], max_new_tokens=8, pad_to=16,
                 stop_tokens=[model_1.cfg.vocab_size],
                 suffixes=[p[s:] or p[-1:] for p, s in zip(prompts, split)])
  whole = [p if p[s:] else p + p[-1:] for p, s in zip(prompts, split)]
  want = generate(model_1, whole, max_new_tokens=8, pad_to=16,
                  stop_tokens=[model_1.cfg.vocab_size])
  assert out == want
  with pytest.raises(ValueError, match="one non-empty token list per prompt"):
    generate(model_1, prompts, max_new_tokens=2, suffixes=[[1]])


@pytest.mark.parametrize("kw, seed", [(CFG_1, 3), (CFG_121, 4)])
def test_compute_weights_leave_the_model_exact(kw, seed):
  """Matrices cast once to the compute dtype (what the decode loop runs on) give bit-identical
  logits in a bf16 model, for every scale; vectors stay float32."""
  from kvcache.decode import compute_weights
  print(f"seed={seed}")
  model = make_model(seed, **{**kw, "dtype": "bfloat16"})
  graphdef, params = nnx.split(model)
  cast = compute_weights(graphdef, params)
  kinds = {(x.ndim >= 2, str(y.dtype)) for x, y in zip(jax.tree.leaves(params),
                                                       jax.tree.leaves(cast))}
  assert kinds == {(True, "bfloat16"), (False, "float32")}
  tokens = random_tokens(seed, (2, 9), model.cfg.vocab_size)
  for k in range(1, len(model.cfg.chains) + 1):
    np.testing.assert_array_equal(forward(nnx.merge(graphdef, cast), tokens, k),
                                  forward(model, tokens, k))
