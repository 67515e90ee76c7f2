"""Paged decoding with prefix sharing: the same greedy tokens as decoding each prompt alone with
the contiguous cache, shared prompt pages held and prefilled once, and bucketed steps that do
not recompile when the batch changes within a bucket."""

import jax.numpy as jnp
import numpy as np
import pytest

from colm.config import ModelConfig
from kvcache import generate
from kvcache.paged import generate_shared, paged_decode_step, paged_prefill

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
  """Two batches of other prompts, suffix lengths and prefix pages, one bucket of every shape
  (batch, table width, groups, members, prefix pages; the pool's pages are a shape too): the
  second compiles no new decode or prefill step."""
  generate_shared(model, _prompts(5, 2), max_new_tokens=3, page_size=4, num_pages=64)
  sizes = paged_decode_step._cache_size(), paged_prefill._cache_size()
  generate_shared(model, _prompts(6, 2), max_new_tokens=3, page_size=4, num_pages=64)
  assert (paged_decode_step._cache_size(), paged_prefill._cache_size()) == sizes


def test_paged_kernel_path_equals_each_prompt_alone(spread_decoder):
  """decode_attn='pallas': decode steps read pages in place through the Pallas paged kernel
  (interpret mode on the CPU) instead of gathering them (the kernel takes head_dim >= 16)."""
  model = spread_decoder(CFG.replace(head_dim=16), 22)
  prompts = _prompts(9, 2)
  got, _ = generate_shared(model, prompts, max_new_tokens=4, page_size=16, decode_attn="pallas")
  for p, row in zip(prompts, got):
    assert generate(model, [p], max_new_tokens=4, pad_to=16) == [row]


def _float64_paged_attention(q, k_pages, v_pages, tables, positions):
  """Each row's whole table, gathered, in float64: q [B, T, K, G, E] -> out, lse."""
  b, t, kh, g, e = q.shape
  s = k_pages.shape[2]
  out, lse = np.zeros(q.shape), np.full(q.shape[:-1], -np.inf)
  for i in np.ndindex(b, t, kh, g):
    bi, ti, hi, _ = i
    n = positions[bi, ti] + 1
    idx = np.arange(n)
    kk = k_pages[hi, tables[bi, idx // s], idx % s].astype(np.float64)
    vv = v_pages[hi, tables[bi, idx // s], idx % s].astype(np.float64)
    sc = kk @ q[i].astype(np.float64) / np.sqrt(e)
    m = sc.max()
    w = np.exp(sc - m)
    lse[i] = m + np.log(w.sum())
    out[i] = w @ vv / w.sum()
  return out, lse


@pytest.mark.parametrize("t,kernel", [(1, False), (1, True), (5, False)])
def test_shared_prefix_attention_equals_attention_over_each_whole_table(t, kernel):
  """Two groups with page-aligned prefixes of different lengths, a row in no group, padding
  rows and groups (buckets); decode (jnp and the Pallas paged kernel) and suffix prefill."""
  from kvcache.paged import prefix_groups, shared_paged_attention
  seed = 31 + t + kernel
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  kh, g, e, s, p = 2, 3, 16, 16, 40
  k_pages, v_pages = (rng.standard_normal((kh, p, s, e)).astype(np.float32) for _ in range(2))
  pre_a, pre_b = [3, 7, 11], [20]  # group prefixes: 3 pages, 1 page
  own = iter(range(21, p))
  rows = [pre_a + [next(own)], pre_a + [next(own), next(own)], pre_b + [next(own)],
          pre_b + [next(own), next(own)], pre_b + [next(own)], [next(own), next(own)]]
  b = 8  # a bucket: rows 6 and 7 are padding
  tables = np.zeros((b, 8), np.int32)
  for i, r in enumerate(rows):
    tables[i, :len(r)] = r
  last = [len(r) * s - 1 - rng.integers(0, s // 2) for r in rows] + [t - 1, t - 1]
  positions = np.asarray([[x - t + 1 + j for j in range(t)] for x in last], np.int32)
  groups = prefix_groups([([0, 1], pre_a), ([2, 3, 4], pre_b), ([5], [])], b, s)
  q = rng.standard_normal((b, t, kh, g, e)).astype(np.float32)
  out, lse = shared_paged_attention(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages),
                                    jnp.asarray(tables), jnp.asarray(positions), groups,
                                    kernel=kernel)
  want_out, want_lse = _float64_paged_attention(q[:6], k_pages, v_pages, tables, positions)
  np.testing.assert_allclose(np.asarray(out)[:6], want_out, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse)[:6], want_lse, atol=2e-5)


@pytest.mark.parametrize("prefix_splits", [None, 1, 3])
def test_shared_prefix_kernel_with_every_row_grouped(prefix_splits):
  """Every row in a group, one member's query inside its first own page, another's pages past
  the prefix many; prefixes of 17 and 9 pages (3 and 2 of the kernel's 128-token tiles), cut
  into prefix splits (default: 2; 3: one split of the shorter prefix empty), merged with the
  own part in one pass: the paged kernel for both parts."""
  from kvcache.paged import prefix_groups, shared_paged_attention
  seed = 37 + (prefix_splits or 0)
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  kh, g, e, s, p = 2, 2, 16, 16, 48
  k_pages, v_pages = (rng.standard_normal((kh, p, s, e)).astype(np.float32) for _ in range(2))
  order = rng.permutation(p)
  pre = [[int(x) for x in order[:17]], [int(x) for x in order[17:26]]]
  own = iter(order[26:])
  counts = [1, 5, 2, 3]
  rows = [pre[i // 2] + [int(next(own)) for _ in range(c)] for i, c in enumerate(counts)]
  tables = np.zeros((4, 24), np.int32)
  for i, r in enumerate(rows):
    tables[i, :len(r)] = r
  positions = np.asarray([[len(r) * s - 1 - rng.integers(0, s)] for r in rows], np.int32)
  groups = prefix_groups([([0, 1], pre[0]), ([2, 3], pre[1])], 4, s)
  q = rng.standard_normal((4, 1, kh, g, e)).astype(np.float32)
  out, lse = shared_paged_attention(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages),
                                    jnp.asarray(tables), jnp.asarray(positions), groups,
                                    kernel=True, prefix_splits=prefix_splits)
  want_out, want_lse = _float64_paged_attention(q, k_pages, v_pages, tables, positions)
  np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5)


def test_prefix_groups_reject_shared_rows():
  from kvcache.paged import prefix_groups
  with pytest.raises(ValueError, match="distinct rows"):
    prefix_groups([([0, 1], [3]), ([1, 2], [4])], 4, 16)
  assert prefix_groups([([0], [3]), ([1, 2], [])], 4, 16) is None


def test_host_buffers_handed_to_the_device_are_never_written_afterwards(model, host_transfers):
  # generate_shared's decode loop rewrites tok and pos in place every step: they reach the
  # device through kvcache.host.to_device, so no buffer it hands over (through jnp or as a
  # jitted call's NumPy argument) changes after the transfer, which on CPU may read it late.
  import kvcache.host
  import kvcache.paged
  seed = 12
  print(f"seed={seed}")
  rec = host_transfers
  rec.watch_jnp(kvcache.paged, kvcache.host)
  rec.watch_calls(kvcache.paged, "paged_decode_step", "paged_prefill")
  prompts = _prompts(seed, 2)
  got, _ = generate_shared(model, prompts, max_new_tokens=4, page_size=4)
  assert all(len(row) == 4 for row in got)  # three decode steps, tok and pos rewritten after each
  assert len(rec.handed) > 10
  written = rec.written()
  assert not written, f"{len(written)} of {len(rec.handed)} host buffers written after transfer"
