"""BatchLLM workloads: counts, lengths, token ranges, the sharing structure each shape promises,
seeded determinism, the shuffled / mixed-output variants, and `group_prompts` finding the
groups back."""

import inspect

import numpy as np
import pytest

from experiments.batch_workloads import (
  LENGTH_ARGS,
  WORKLOADS,
  micro,
  mixed_outputs,
  multi_level,
  scaled,
  shared_prefix,
  shuffled,
)
from kvcache.batchllm import Request, group_prompts, prefill_tokens, tree_tokens


def lcp(prompts) -> int:
  n = min(map(len, prompts))
  for i in range(n):
    if len({p[i] for p in prompts}) > 1:
      return i
  return n


def blocks(requests, size):
  return [requests[i:i + size] for i in range(0, len(requests), size)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("vocab", [3, 256])
def test_shared_prefix_shape_and_sharing(seed, vocab):
  print(f"seed={seed}")
  rs = shared_prefix(groups=5, per_group=4, prefix=12, question=3, output=7, vocab=vocab,
                     seed=seed)
  assert len(rs) == 20 and all(isinstance(r, Request) for r in rs)
  assert all(len(r.prompt) == 15 and r.max_new_tokens == 7 and r.stop == () for r in rs)
  assert all(0 <= t < vocab for r in rs for t in r.prompt)
  stems = set()
  for g in blocks(rs, 4):
    assert lcp([r.prompt for r in g]) == 12  # exactly the prefix, never more
    stems.add(g[0].prompt[:12])
  assert len(stems) == 5  # distinct system prompts
  assert shared_prefix(groups=5, per_group=4, prefix=12, question=3, vocab=vocab,
                       seed=seed) == [Request(r.prompt, 256) for r in rs]


def test_group_prompts_recovers_shared_prefix_groups():
  seed = 0
  print(f"seed={seed}")
  rs = shared_prefix(groups=6, per_group=5, prefix=24, question=6, seed=seed)
  prompts = [r.prompt for r in rs]
  groups = group_prompts(prompts)
  assert [g.members for g in groups] == [list(range(i, i + 5)) for i in range(0, 30, 5)]
  assert all(g.prefix == prompts[g.members[0]][:24] for g in groups)
  assert prefill_tokens(groups, prompts) == 6 * (24 + 5 * 6)
  # Shuffled submission: the same groups, found by content.
  order = shuffled(list(range(30)), seed=seed)
  got = group_prompts([prompts[i] for i in order])
  assert sorted(sorted(order[m] for m in g.members) for g in got) == [g.members for g in groups]


def test_micro_shape():
  seed = 2
  print(f"seed={seed}")
  rs = micro(groups=3, sharing=6, prefix=20, suffix=2, output=5, vocab=11, seed=seed)
  assert len(rs) == 18 and {len(r.prompt) for r in rs} == {22}
  assert {r.max_new_tokens for r in rs} == {5}
  for g in blocks(rs, 6):
    assert lcp([r.prompt for r in g]) == 20
  groups = group_prompts([r.prompt for r in rs])
  assert [g.members for g in groups] == [list(range(i, i + 6)) for i in (0, 6, 12)]


def test_multi_level_shape_and_levels():
  seed = 1
  print(f"seed={seed}")
  rs = multi_level(systems=2, docs_per_system=3, questions_per_doc=4, system_len=8, doc_len=8,
                   question_len=3, output=9, seed=seed)
  assert len(rs) == 24 and {len(r.prompt) for r in rs} == {19}
  prompts = [r.prompt for r in rs]
  for s in blocks(prompts, 12):
    assert lcp(s) == 8  # a system prompt shared by its documents
    for d in blocks(s, 4):
      assert lcp(d) == 16  # system prompt + document shared by its questions
  assert lcp(prompts) < 8
  groups = group_prompts(prompts)
  assert [g.members for g in groups] == [list(range(i, i + 4)) for i in range(0, 24, 4)]
  # One level cannot share the system prompt across documents; the tree could.
  assert tree_tokens(prompts) == 2 * 8 + 6 * 8 + 24 * 3 < prefill_tokens(groups, prompts)


def test_stop_ids_are_carried_and_never_drawn():
  seed = 5
  print(f"seed={seed}")
  for name in WORKLOADS:
    rs = scaled(name, 0.01, vocab=4, stop=(0, 2), seed=seed)
    assert all(r.stop == (0, 2) for r in rs), name
    assert {t for r in rs for t in r.prompt} <= {1, 3}, name
  with pytest.raises(ValueError, match="leaves 1 token ids"):
    shared_prefix(vocab=3, stop=(0, 1))


def test_shuffled_and_mixed_outputs():
  seed = 7
  print(f"seed={seed}")
  rs = micro(groups=4, sharing=3, prefix=5, suffix=2, seed=seed)
  sh = shuffled(rs, seed=seed)
  assert sh != rs and sorted(sh, key=rs.index) == rs and shuffled(rs, seed=seed) == sh
  mixed = mixed_outputs(rs, low=3, high=6, seed=seed)
  assert [r.prompt for r in mixed] == [r.prompt for r in rs]
  outs = [r.max_new_tokens for r in mixed]
  assert all(3 <= n <= 6 for n in outs) and len(set(outs)) > 1
  assert mixed_outputs(rs, 3, 6, seed=seed) == mixed
  assert {r.max_new_tokens for r in mixed_outputs(rs, 4, 4)} == {4}
  with pytest.raises(ValueError, match="high=2 < low=3"):
    mixed_outputs(rs, 3, 2)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_scaled_makes_toy_sizes_and_passes_keywords(name):
  seed = 3
  print(f"seed={seed}")
  fn = WORKLOADS[name]
  toy = scaled(name, 0.01, seed=seed)
  params = inspect.signature(fn).parameters
  want = {a: max(1, -(-params[a].default // 100)) for a in LENGTH_ARGS[name]}
  assert toy == fn(**want, seed=seed)  # lengths / 100 rounded up, counts at their defaults
  assert max(len(r.prompt) for r in toy) < 60
  assert {r.max_new_tokens for r in toy} == {want["output"]}
  assert scaled(name, 0.01, output=2, seed=seed) == fn(**{**want, "output": 2}, seed=seed)
  with pytest.raises(ValueError, match="has no arguments"):
    scaled(name, 0.5, nonsense=1)


def test_scaled_rejects_unknown_workloads_and_bad_sizes():
  with pytest.raises(ValueError, match="unknown workload"):
    scaled("nope")
  with pytest.raises(ValueError, match="scale must be > 0"):
    scaled("micro", 0)
  with pytest.raises(ValueError, match="groups must be >= 1"):
    shared_prefix(groups=0)
  with pytest.raises(ValueError, match="distinct"):
    shared_prefix(groups=10, prefix=1, vocab=3)


def test_default_sizes():
  rs = shared_prefix(groups=2)  # full lengths, two groups (the defaults build 1024 requests)
  assert len(rs) == 32 and {len(r.prompt) for r in rs} == {2048 + 128}
  assert {r.max_new_tokens for r in rs} == {256}
  assert np.all(np.asarray([r.prompt for r in rs]) < 256)
