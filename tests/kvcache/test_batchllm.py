"""BatchLLM planning: requests and their checks, the batch's radix tree, one-level prefix groups
equal to a brute-force optimum over all partitions, the prefill cost, and the group reorder."""

from fractions import Fraction

import numpy as np
import pytest

from kvcache.batchllm import (
  PrefixGroup,
  Request,
  build_prefix_tree,
  group_prompts,
  make_request,
  order_groups,
  prefill_tokens,
  tree_tokens,
)


def lcp(a, b) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def group_cost(prompts, members) -> int:
  """Prefill tokens of one group sharing its members' longest common prefix, capped at len-1."""
  if len(members) == 1:
    return len(prompts[members[0]])
  n = min(len(prompts[m]) for m in members) - 1
  n = min([n] + [lcp(prompts[members[0]], prompts[m]) for m in members[1:]])
  return sum(len(prompts[m]) for m in members) - (len(members) - 1) * n


def partitions(items):
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for p in partitions(rest):
    yield [[first], *p]
    for i in range(len(p)):
      yield [*p[:i], [first, *p[i]], *p[i + 1:]]


def brute_force(prompts) -> int:
  return min(sum(group_cost(prompts, g) for g in p) for p in partitions(list(range(len(prompts)))))


def random_prompts(rng, vocab=3, max_len=8):
  """2-6 prompts of 1-8 tokens from a vocab of 3, most grown from one of 1-2 random stems."""
  stems = [rng.integers(0, vocab, rng.integers(0, 7)).tolist() for _ in range(rng.integers(1, 3))]
  out = []
  for _ in range(rng.integers(2, 7)):
    stem = stems[rng.integers(len(stems))]
    if rng.random() < 0.3:
      stem = stem[:rng.integers(0, len(stem) + 1)]
    p = (stem + rng.integers(0, vocab, rng.integers(0, 5)).tolist())[:max_len]
    out.append(p or [int(rng.integers(vocab))])
  return out


def check_groups(groups, prompts):
  """Every prompt in exactly one group; prefixes are common prefixes leaving >= 1 token."""
  assert sorted(m for g in groups for m in g.members) == list(range(len(prompts)))
  assert [g.members[0] for g in groups] == sorted(g.members[0] for g in groups)
  for g in groups:
    assert g.members == sorted(g.members)
    assert isinstance(g.prefix, tuple)
    if len(g.members) == 1:
      assert g.prefix == ()
    for m in g.members:
      assert tuple(prompts[m][:len(g.prefix)]) == g.prefix
      assert len(g.prefix) <= len(prompts[m]) - 1


# --- requests ----------------------------------------------------------------------------------


def test_request_converts_lists_and_arrays_to_tuples():
  r = Request([3, 1, 2], 5, [0])
  assert r.prompt == (3, 1, 2) and r.stop == (0,) and r.max_new_tokens == 5
  assert make_request(np.array([4, 5], np.int32), stop=np.array([7])) == Request((4, 5), 32, (7,))
  assert all(type(t) is int for t in Request(np.arange(3)).prompt)
  assert make_request([np.int64(9), 2]).prompt == (9, 2)
  hash(r)  # frozen and hashable


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 2.5]), "must be ints"),
    (dict(prompt="abc"), "sequence of int"),
    (dict(prompt=[1, True]), "must be ints"),
    (dict(prompt=[1, -2]), ">= 0"),
    (dict(prompt=np.array([1.0, 2.0])), "integer array"),
    (dict(prompt=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=[1], max_new_tokens=2.0), "max_new_tokens"),
    (dict(prompt=[1], stop=[0.5]), "stop token ids must be ints"),
])
def test_request_rejects_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_request(**kwargs)


@pytest.mark.parametrize("fn", [build_prefix_tree, group_prompts, tree_tokens])
def test_planning_rejects_bad_prompts(fn):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    fn([[1, 2], []])
  with pytest.raises(ValueError, match="prompt 0 token ids must be ints"):
    fn([[1, "a"]])


# --- the prefix tree -----------------------------------------------------------------------------


def test_tree_is_a_compressed_trie_with_leaf_counts():
  prompts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2], [7], [1, 2, 3, 4]]
  root = build_prefix_tree(prompts)
  assert root.depth == 0 and root.tokens == () and root.leaves == 5
  assert set(root.children) == {1, 7}
  stem = root.children[1]
  assert stem.tokens == (1, 2) and stem.ends == [2] and stem.prompts == [0, 1, 2, 4]
  mid = stem.children[3]
  assert mid.tokens == (3,) and mid.depth == 3 and mid.leaves == 3 and mid.ends == []
  assert mid.children[4].ends == [0, 4] and mid.children[5].tokens == (5, 6)
  assert root.children[7].prompts == [3]
  assert tree_tokens(prompts) == 2 + 1 + 1 + 2 + 1


@pytest.mark.parametrize("seed", range(5))
def test_tree_paths_and_token_count(seed):
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  prompts = [p for _ in range(6) for p in random_prompts(rng)]
  root = build_prefix_tree(prompts)
  paths = {id(root): ()}
  for node in root.walk():
    if node is not root:  # radix form: no pass-through node without a branch or an end
      assert node.tokens and (node.ends or len(node.children) != 1)
    for first, c in node.children.items():
      assert c.tokens[0] == first
      paths[id(c)] = paths[id(node)] + c.tokens
      assert c.depth == len(paths[id(c)])
    for i in node.ends:
      assert tuple(prompts[i]) == paths[id(node)]
    want = [i for i, p in enumerate(prompts) if tuple(p[:node.depth]) == paths[id(node)]]
    assert node.prompts == want
  distinct = {tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)}
  assert tree_tokens(prompts) == len(distinct)


# --- grouping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_grouping_equals_brute_force_optimum(seed):
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  for _ in range(100):
    prompts = random_prompts(rng)
    groups = group_prompts(prompts)
    check_groups(groups, prompts)
    cost = prefill_tokens(groups, prompts)
    assert cost == brute_force(prompts), (prompts, groups)
    assert tree_tokens(prompts) <= cost <= sum(map(len, prompts))


def test_gain_rule_keeps_a_deeper_group_only_when_it_pays():
  s = [9] * 10
  # Two prompts branch 1 token below the stem: (2 - 1) * 1 - 10 < 0, they stay in the stem group.
  prompts = [s + [1], s + [2], s + [3, 4, 0], s + [3, 5, 0]]
  assert group_prompts(prompts) == [PrefixGroup(tuple(s), [0, 1, 2, 3])]
  # The branch now adds 20 tokens: (2 - 1) * 21 - 10 > 0, a nested group of its own.
  t = [3] * 20
  prompts = [s + [1], s + [2], s + t + [4], s + t + [5]]
  assert group_prompts(prompts) == [PrefixGroup(tuple(s), [0, 1]),
                                    PrefixGroup(tuple(s + t), [2, 3])]
  assert prefill_tokens(group_prompts(prompts), prompts) == 10 + 2 + 30 + 2


def test_prompts_ending_inside_a_prefix_and_duplicates():
  # A prompt equal to the shared stem can only share stem[:-1]; duplicates share all but one.
  s = list(range(1, 9))
  prompts = [s, s + [20, 21], s + [30, 31], [5, 5, 5], [5, 5, 5]]
  groups = group_prompts(prompts)
  assert groups == [PrefixGroup(tuple(s[:-1]), [0, 1, 2]), PrefixGroup((5, 5), [3, 4])]
  assert prefill_tokens(groups, prompts) == brute_force(prompts) == 7 + 1 + 3 + 3 + 2 + 1 + 1
  assert group_prompts([[4]]) == [PrefixGroup((), [0])]
  assert group_prompts([[4], [4]]) == [PrefixGroup((), [0]), PrefixGroup((), [1])]


def test_groups_recover_shared_prefix_blocks_in_any_order():
  seed = 3
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  stems = [rng.integers(0, 50, 30).tolist() for _ in range(4)]
  prompts = [st + rng.integers(0, 50, 5).tolist() for st in stems for _ in range(6)]
  perm = rng.permutation(len(prompts))
  groups = group_prompts([prompts[i] for i in perm])
  assert len(groups) == 4
  for g in groups:
    (k,) = {perm[m] // 6 for m in g.members}
    assert len(g.members) == 6 and g.prefix[:30] == tuple(stems[k])


def test_prefill_tokens_checks_groups():
  prompts = [[1, 2, 3], [1, 2, 4]]
  assert prefill_tokens([PrefixGroup((1, 2), [0, 1])], prompts) == 4
  assert prefill_tokens([PrefixGroup((), [0]), PrefixGroup((), [1])], prompts) == 6
  with pytest.raises(ValueError, match="exactly once.*missing \\[1\\]"):
    prefill_tokens([PrefixGroup((), [0])], prompts)
  with pytest.raises(ValueError, match="exactly once.*repeated \\[1\\]"):
    prefill_tokens([PrefixGroup((), [0, 1]), PrefixGroup((), [1])], prompts)
  with pytest.raises(ValueError, match="not a proper prefix"):
    prefill_tokens([PrefixGroup((1, 2, 3), [0, 1])], prompts)
  with pytest.raises(ValueError, match="not a proper prefix"):
    prefill_tokens([PrefixGroup((1, 3), [0, 1])], prompts)


# --- reorder -----------------------------------------------------------------------------------


def test_order_groups_puts_decode_heavy_groups_first_stably():
  requests = [Request([1] * 10, 10), Request([1] * 9 + [2], 10),  # ratio 20 / 11
              Request([5] * 4, 2),  # 2 / 4
              Request([6] * 20, 40),  # 40 / 20
              Request([7] * 8, 4),  # 4 / 8: ties with the 2 / 4 group
              Request([8] * 2, 1), Request([8, 9], 1)]  # 2 / 3
  groups = [PrefixGroup((1,) * 9, [0, 1]), PrefixGroup((), [2]), PrefixGroup((), [3]),
            PrefixGroup((), [4]), PrefixGroup((8,), [5, 6])]
  got = order_groups(groups, requests)
  assert [g.members for g in got] == [[3], [0, 1], [5, 6], [2], [4]]
  assert got[1] is groups[0]  # the same group objects, reordered
  assert [g.members for g in order_groups(groups[3:4] + groups[1:2], requests)] == [[4], [2]]
  with pytest.raises(ValueError, match="at most once: out of range \\[7\\]"):
    order_groups([PrefixGroup((), [7])], requests)
  with pytest.raises(ValueError, match="repeated \\[2\\]"):
    order_groups([groups[1], groups[1]], requests)


@pytest.mark.parametrize("seed", range(3))
def test_order_groups_ratios_descend(seed):
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  prompts = [p for _ in range(5) for p in random_prompts(rng, vocab=2)]
  requests = [Request(p, int(rng.integers(1, 6))) for p in prompts]
  groups = order_groups(group_prompts(prompts), requests)
  ratios = []
  for g in groups:
    n = len(g.prefix)
    prompt = n + sum(len(prompts[m]) - n for m in g.members)
    ratios.append(Fraction(sum(requests[m].max_new_tokens for m in g.members), prompt))
  assert ratios == sorted(ratios, reverse=True)
