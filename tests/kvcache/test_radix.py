"""The radix tree over the pool: match = brute-force longest common prefix over what was
inserted, and the pages it returns hold exactly those tokens; edges split at any token; locks
protect running prefixes from eviction; LRU eviction and explicit removal free every page."""

import numpy as np
import pytest

from kvcache.radix import RadixTree


def _lcp(a, b) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _admit(sim, tree, seq, tokens):
  """A request: reuse the tree's prefix pages, prefill the rest, insert the whole prompt."""
  m, pages = tree.match(tokens)
  sim.apply(sim.pool.add(seq, pages, m))
  sim.tokens[seq] = list(tokens[:m])
  # The reused pages hold the prefix already: check before writing the rest.
  sim.check(exact_refs=False)
  sim.write(seq, list(tokens[m:]))
  tree.insert(tokens, sim.pool.table(seq))
  return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_equals_brute_force_and_pages_hold_the_tokens(seed, pool_sim):
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  sim = pool_sim(num_pages=400, page_size=4)
  tree = RadixTree(sim.pool)
  stems = [rng.integers(0, 5, rng.integers(0, 12)).tolist() for _ in range(4)]
  inserted = []
  for i in range(40):
    tokens = stems[rng.integers(4)] + rng.integers(0, 5, rng.integers(1, 10)).tolist()
    want = max([_lcp(tokens, s) for s in inserted] + [0])
    assert _admit(sim, tree, i, tokens) == want
    inserted.append(tokens)
    sim.pool.release(i)  # the tree alone holds its pages now
    del sim.tokens[i]
    probe = stems[rng.integers(4)] + rng.integers(0, 5, rng.integers(0, 6)).tolist()
    m, pages = tree.match(probe)
    assert m == max(_lcp(probe, s) for s in inserted)
    got = [sim.content[pages[t // 4], t % 4] for t in range(m)]
    assert got == probe[:m]
  assert tree.stored_tokens() <= sum(len(s) for s in inserted)
  # Everything unlocked: evicting for the whole pool frees every page.
  assert tree.evict(sim.pool.num_pages) == sim.pool.num_pages
  assert sim.pool.pages_in_use == 0 and tree.root.children == {}


def test_split_at_any_token_keeps_pages_held(pool_sim):
  sim = pool_sim(num_pages=32, page_size=4)
  tree = RadixTree(sim.pool)
  a = list(range(10))
  _admit(sim, tree, "a", a)
  for cut in (7, 5, 1):  # splits inside a page, at the next, near the root
    b = a[:cut] + [99, 98]
    assert _admit(sim, tree, f"b{cut}", b) == cut
    sim.check(exact_refs=False)
  for seq in list(sim.tokens):
    sim.pool.release(seq)
    del sim.tokens[seq]
  m, pages = tree.match(a)
  assert m == 10 and [sim.content[pages[t // 4], t % 4] for t in range(10)] == a
  tree.remove(a[:7] + [99, 98])
  assert tree.match(a[:7] + [99, 98])[0] == 7  # its own tail is gone, the shared prefix stays
  with pytest.raises(KeyError, match="not a stored path"):
    tree.remove([5, 5])


def test_locked_prefixes_survive_lru_eviction(pool_sim):
  sim = pool_sim(num_pages=12, page_size=4)
  tree = RadixTree(sim.pool)
  old, hot, new = [1] * 8, [2] * 8, [3] * 8
  for i, t in enumerate((old, hot, new)):
    _admit(sim, tree, i, t)
    sim.pool.release(i)
    del sim.tokens[i]
  tree.lock(hot)
  tree.match(new)  # new is now more recent than old
  assert sim.pool.free_pages == 6
  assert tree.evict(8) == 8 and tree.match(old)[0] == 0 and tree.match(new)[0] == 8
  assert tree.evict(12) == 10 and tree.match(hot)[0] == 8  # locked: kept
  tree.lock(hot, -1)
  assert tree.evict(12) == 12
  with pytest.raises(ValueError, match="retain of a free page"):
    tree.insert(hot, [0, 1])  # pages nobody holds: rejected, the tree unchanged
  assert tree.root.children == {}
  _admit(sim, tree, 3, hot)
  with pytest.raises(ValueError, match="not locked"):
    tree.lock(hot, -1)
  with pytest.raises(KeyError, match="not a stored node boundary"):
    tree.lock(hot[:3])
