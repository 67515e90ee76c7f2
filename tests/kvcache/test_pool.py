"""The page pool: random fork / extend / release sequences keep reference counts exact and never
negative, copy-on-write keeps every sequence's tokens intact, everything is freed at the end,
and rejected calls (out of pages, unknown or released sequences) change nothing."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest

from colm.config import ModelConfig
from kvcache.pool import OutOfPages, PagePool, copy_pages, init_paged_kv


def _state(pool):
  return (pool._ref.copy(), list(pool._free), copy.deepcopy(pool._tables), dict(pool._lengths))


def _same(a, b):
  return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_fork_extend_release(seed, pool_sim):
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  sim = pool_sim(num_pages=24, page_size=4)
  next_id = 0
  for _ in range(300):
    op = rng.choice(["new", "fork", "extend", "release"], p=[0.15, 0.3, 0.35, 0.2])
    live = list(sim.tokens)
    try:
      before = _state(sim.pool)
      if op == "new" or not live:
        sim.pool.add(next_id)
        sim.tokens[next_id] = []
        sim.write(next_id, rng.integers(0, 100, rng.integers(1, 9)).tolist())
        next_id += 1
      elif op == "fork":
        parent = int(rng.choice(live))
        sim.apply(sim.pool.fork(parent, next_id))
        sim.tokens[next_id] = list(sim.tokens[parent])
        next_id += 1
      elif op == "extend":
        seq = int(rng.choice(live))
        sim.write(seq, rng.integers(0, 100, rng.integers(1, 7)).tolist())
      else:
        seq = int(rng.choice(live))
        sim.pool.release(seq)
        del sim.tokens[seq]
    except OutOfPages:
      # A rejected call leaves the pool as it was (a half-made new sequence is dropped).
      if op in ("new", "fork") and next_id in sim.pool.sequences():
        sim.pool.release(next_id)
        sim.tokens.pop(next_id, None)
        next_id += 1
      else:
        assert _same(before, _state(sim.pool))
    sim.check()
  for seq in list(sim.tokens):
    sim.pool.release(seq)
  assert sim.pool.pages_in_use == 0 and (sim.pool._ref == 0).all()
  assert sim.pool.peak_pages > 12  # the run really filled the pool


def test_fork_shares_full_pages_and_copies_the_partial_one():
  pool = PagePool(8, 4)
  pool.add("a")
  pool.extend("a", 6)  # pages: one full, one with 2 tokens
  full, part = pool.table("a")
  copies = pool.fork("a", "b")
  assert pool.table("b")[0] == full and pool.refcount(full) == 2
  assert copies == [(part, pool.table("b")[1])] and pool.refcount(part) == 1
  # A fork at a page boundary copies nothing; writing after it allocates a fresh page.
  pool.extend("b", 2)
  assert pool.fork("b", "c") == [] and pool.refcount(pool.table("b")[1]) == 2
  assert pool.extend("c", 1) == [] and len(pool.table("c")) == 3
  # A new sequence on a's 6 tokens shares the full page and copies the partial one.
  assert len(pool.add("d", pool.table("a"), 6)) == 1
  pool.release("a")  # a's partial page has no holder left
  assert pool.refcount(part) == 0 and pool.refcount(full) == 3  # b, c, d
  assert pool.pages_in_use == 4  # full, b's second page (shared with c), c's third, d's copy


def test_bad_calls_are_errors_and_change_nothing():
  pool = PagePool(4, 4)
  pool.add(0)
  pool.extend(0, 9)  # 3 pages
  before = _state(pool)
  with pytest.raises(OutOfPages, match="need 2 pages, 1 of 4 free"):
    pool.extend(0, 8)
  assert _same(before, _state(pool))
  with pytest.raises(KeyError, match="unknown sequence 7"):
    pool.fork(7, 8)
  with pytest.raises(ValueError, match="exists already"):
    pool.add(0)
  pool.release(0)
  with pytest.raises(KeyError, match="unknown sequence 0"):
    pool.release(0)
  assert pool.pages_in_use == 0
  with pytest.raises(ValueError, match="power of two"):
    PagePool(4, 12)


def test_page_tables_are_bucketed_and_device_copies_run():
  pool = PagePool(16, 4)
  for s, n in (("a", 3), ("b", 13)):
    pool.add(s)
    pool.extend(s, n)
  tables, lengths = pool.page_tables(["a", "b"])
  assert tables.shape == (2, 4) and lengths.tolist() == [3, 13]  # 4 pages -> width 4
  pool.extend("b", 4)
  assert pool.page_tables(["a", "b"])[0].shape == (2, 8)  # 5 pages -> the next bucket
  padded, plen = pool.page_tables(["b", "a"], rows=4)  # a batch bucket: rows past them empty
  assert padded.shape == (4, 8) and plen.tolist() == [17, 3, 0, 0] and not padded[2:].any()
  with pytest.raises(ValueError, match="rows 1 is below the number of sequences"):
    pool.page_tables(["a", "b"], rows=1)
  cfg = ModelConfig.tiny(n_layers=2)
  kv = init_paged_kv(cfg, 16, 4)
  kv.k = tuple(k.at[:, 3].set(1.0) for k in kv.k)  # [K, P, S, E]
  kv = copy_pages(kv, jnp.asarray([3]), jnp.asarray([9]))
  assert float(kv.k[1][:, 9].min()) == 1.0 and float(kv.v[0][:, 9].max()) == 0.0
  assert kv.nbytes() == 2 * 2 * 16 * cfg.n_kv_heads * 4 * cfg.head_dim * 4
