"""Paged decoding with prefix sharing: the same greedy tokens as decoding each prompt alone with
the contiguous cache, shared prompt pages held and prefilled once, and bucketed steps that do
not recompile when the batch changes within a bucket."""

import numpy as np
import pytest

from colm.config import ModelConfig
from kvcache import generate
from kvcache.paged import generate_shared, paged_decode_step

CFG = ModelConfig.tiny(d_model=45, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=53,
                       max_seq_len=96, n_layers=2)


@pytest.fixture(scope="module")
def model(spread_decoder):
  return spread_decoder(CFG, 21)


def _prompts(seed, n, stem_len=20):
  rng = np.random.default_rng(seed)
  stem = rng.integers(0, CFG.vocab_size, stem_len).tolist()
  other = rng.integers(0, CFG.vocab_size, 7).tolist()
  out = [stem + rng.integers(0, CFG.vocab_size, rng.integers(1, 9)).tolist() for _ in range(n)]
  return out + [other, stem[:13]]  # one prompt shares nothing, one is inside the stem


def test_shared_generation_equals_each_prompt_alone(model):
  seed = 4
  print(f"seed={seed}")
  prompts = _prompts(seed, 3)
  got, stats = generate_shared(model, prompts, max_new_tokens=6, page_size=4)
  for p, row in zip(prompts, got):
    assert generate(model, [p], max_new_tokens=6, pad_to=16) == [row]
  # The 20-token stem is prefilled once: later prompts prefill only their own tails.
  assert stats.prefilled_tokens < stats.prompt_tokens - 2 * 19
  unshared = sum(-(-(len(p) + 6) // 4) for p in prompts)
  assert stats.prefill_pages < unshared


def test_bucketed_decode_steps_do_not_recompile(model):
  # One pool size for both (pages are a shape too); batch 3 and 4 share the bucket 4.
  generate_shared(model, _prompts(5, 1), max_new_tokens=3, page_size=4, num_pages=64)
  size = paged_decode_step._cache_size()
  generate_shared(model, _prompts(6, 2)[:4], max_new_tokens=3, page_size=4, num_pages=64)
  assert paged_decode_step._cache_size() == size


def test_paged_kernel_path_equals_each_prompt_alone(spread_decoder):
  """decode_attn='pallas': decode steps read pages in place through the Pallas paged kernel
  (interpret mode on the CPU) instead of gathering them (the kernel takes head_dim >= 16)."""
  model = spread_decoder(CFG.replace(head_dim=16), 22)
  prompts = _prompts(9, 2)
  got, _ = generate_shared(model, prompts, max_new_tokens=4, page_size=16, decode_attn="pallas")
  for p, row in zip(prompts, got):
    assert generate(model, [p], max_new_tokens=4, pad_to=16) == [row]
