"""Builders the cache tests share: a page pool with a host copy of what every page holds."""

import numpy as np
import pytest

from kvcache.pool import PagePool


class PoolSim:
  """A pool plus a host copy of what each page holds, to check copy-on-write end to end."""

  def __init__(self, num_pages, page_size):
    self.pool = PagePool(num_pages, page_size)
    self.content = np.full((num_pages, page_size), -1, np.int64)
    self.tokens: dict[int, list[int]] = {}

  def apply(self, copies):
    for src, dst in copies:
      self.content[dst] = self.content[src]

  def write(self, seq, new):
    start = len(self.tokens[seq])
    self.apply(self.pool.extend(seq, len(new)))
    for (page, off), tok in zip(self.pool.slots(seq, start, len(new)), new):
      self.content[page, off] = tok
    self.tokens[seq] += list(new)

  def check(self, exact_refs: bool = True):
    """Every sequence reads back what it wrote; refcounts = holders (>= with a tree holding)."""
    held = {}
    for s, toks in self.tokens.items():
      table = self.pool.table(s)
      assert len(table) == -(-len(toks) // self.pool.page_size)
      got = [self.content[table[t // self.pool.page_size], t % self.pool.page_size]
             for t in range(len(toks))]
      assert got == toks, f"sequence {s} reads {got}, wrote {toks}"
      for p in table:
        held[p] = held.get(p, 0) + 1
    for p in range(self.pool.num_pages):
      r = self.pool.refcount(p)
      assert r >= 0 and (r == held.get(p, 0) if exact_refs else r >= held.get(p, 0))
    assert self.pool.pages_in_use <= self.pool.peak_pages
    if exact_refs:
      assert self.pool.pages_in_use == len(held)



@pytest.fixture
def pool_sim():
  """PoolSim(num_pages, page_size): a PagePool plus a host model of page contents."""
  return PoolSim
