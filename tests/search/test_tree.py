"""The search tree over the paged pool: page accounting under random expansions and prunes
(refcounts never negative, everything freed at the end), a searched sequence's logits equal to a
dense forward over the same tokens, steps that end where they should, bad calls."""

import numpy as np
import pytest

from colm.config import ModelConfig
from kvcache.pool import OutOfPages
from kvcache.sampling import SamplingConfig
from search.tree import SearchTree


@pytest.fixture(scope="module")
def model(spread_decoder):
  return spread_decoder(ModelConfig.tiny(max_seq_len=256, n_kv_heads=2, n_heads=4, n_layers=2),
                        11)


def _tree(model, seed, **kw):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(3, model.cfg.vocab_size, 21).tolist()
  kw = {"step_token": 1, "stop_tokens": [2], "page_size": 8, "num_pages": 512,
        "max_step_tokens": 6, "sampling": SamplingConfig(temperature=1.0), "seed": seed, **kw}
  return SearchTree(model, prompt, **kw)


def test_pages_are_shared_and_freed(model):
  seed = 101
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  tree = _tree(model, seed)
  frontier = tree.expand({tree.root: 4})
  for _ in range(3):
    live = [n for n in frontier if not tree.nodes[n].done]
    counts = {n: int(rng.integers(0, 3)) for n in live}
    for n in frontier:
      if tree.nodes[n].done:
        tree.release(n)
    frontier = tree.expand(counts)
    refs = [tree.pool.refcount(p) for p in range(tree.pool.num_pages)]
    assert min(refs) >= 0
    # Shared pages: the leaves' tables together name fewer distinct pages than they hold.
    tables = [tree.pool.table(n) for n in tree.frontier()]
    assert tree.pool.pages_in_use == len({p for t in tables for p in t})
    if len(tables) > 1:
      assert tree.pool.pages_in_use < sum(map(len, tables))
    # Tokens held: each node on a frontier path once (the prompt excluded).
    ancestors = set()
    for n in tree.frontier():
      while tree.nodes[n].parent is not None:
        ancestors.add(n)
        n = tree.nodes[n].parent
    assert tree.tokens_held() == sum(len(tree.nodes[a].tokens) for a in ancestors)
    per_leaf = sum(len(tree.path(n)) - len(tree.nodes[tree.root].tokens) for n in tree.frontier())
    assert tree.tokens_held() <= per_leaf
  stats = tree.kv_stats()
  assert stats["peak_tokens_no_prompt"] >= stats["mean_tokens_no_prompt"] > 0
  assert stats["peak_pages"] >= stats["mean_pages"] >= stats["prompt_pages"] > 0
  assert stats["peak_pages_no_prompt"] == stats["peak_pages"] - stats["prompt_pages"]
  tree.close()
  assert tree.pool.pages_in_use == 0


def test_searched_logits_equal_a_dense_forward(model, full_forward):
  seed = 102
  print(f"seed={seed}")
  tree = _tree(model, seed)
  kids = tree.expand({tree.root: 3})
  grand = tree.expand({k: 1 for k in kids if not tree.nodes[k].done})
  for n in grand + [k for k in kids if tree.nodes[k].done]:
    tokens = tree.path(n)
    dense = np.asarray(full_forward(model, np.asarray([tokens], np.int32)))[0, -1]
    np.testing.assert_allclose(tree.nodes[n].logits, dense, atol=2e-4, rtol=2e-4)
  tree.close()


def test_steps_end_at_a_step_or_stop_token_or_the_limit(model):
  seed = 103
  print(f"seed={seed}")
  tree = _tree(model, seed, max_step_tokens=3)
  for n in tree.expand({tree.root: 8}):
    node = tree.nodes[n]
    assert 1 <= len(node.tokens) <= 3
    ended = node.tokens[-1] in (1, 2)
    assert ended != node.truncated
    assert node.done == (node.tokens[-1] == 2)
    assert tree.steps(n) == [node.tokens]
  assert tree.tokens_generated == sum(len(tree.nodes[n].tokens) for n in tree.frontier())
  tree.close()


def test_bad_calls_are_one_line_errors(model):
  tree = _tree(model, 104)
  kids = tree.expand({tree.root: 2})
  with pytest.raises(ValueError, match="holds no pages"):
    tree.expand({tree.root: 1})
  with pytest.raises(ValueError, match=">= 0"):
    tree.expand({kids[0]: -1})
  tree.release(kids[1])
  with pytest.raises(ValueError, match="holds no pages"):
    tree.release(kids[1])
  with pytest.raises(ValueError, match="at least one token"):
    SearchTree(model, [], step_token=1)
  tree.close()


def test_a_pool_that_runs_dry_retracts_a_root_or_raises(model):
  seed = 105
  print(f"seed={seed}")
  tree = _tree(model, seed, num_pages=12, max_step_tokens=6)
  other = tree.add_root(np.random.default_rng(seed).integers(3, 50, 21).tolist())
  assert tree.pages_held(other) == tree.pages_held() == 3
  with pytest.raises(OutOfPages):  # no on_short: the shortage is an error
    tree.expand({tree.root: 4, other: 4})
  tree.close()
  tree = _tree(model, seed, num_pages=12, max_step_tokens=6)
  other = tree.add_root(np.random.default_rng(seed).integers(3, 50, 21).tolist())
  # Short while forking (21-token prompts: 4 + 4 partial-page copies) or while the first token
  # of a step takes a new page (24-token prompts, full pages shared: 2 + 2 new pages).
  rng = np.random.default_rng(seed)
  for n, length, pages in ((4, 21, 12), (2, 24, 8)):
    tree = SearchTree(model, rng.integers(3, 50, length).tolist(), step_token=1,
                      stop_tokens=[2], page_size=8, num_pages=pages, max_step_tokens=6,
                      sampling=SamplingConfig(temperature=1.0), seed=seed)
    other = tree.add_root(rng.integers(3, 50, length).tolist())
    tree.on_short = lambda other=other: other
    kids = tree.expand({tree.root: n, other: n})
    assert len(kids) == n and all(tree.nodes[k].root == tree.root for k in kids)
    assert tree.frontier(other) == [] and tree.pool.pages_in_use == tree.pages_held()
    tree.close()
    assert tree.pool.pages_in_use == 0


def test_logits_stay_exact_under_prunes_and_several_roots(model, full_forward):
  seed = 106
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  tree = _tree(model, seed)
  roots = [tree.root, tree.add_root(rng.integers(3, 50, 17).tolist())]
  front = tree.expand({r: 3 for r in roots})
  for _ in range(3):  # done leaves released, the others given 0-2 children (0: pruned)
    for n in front:
      if tree.nodes[n].done:
        tree.release(n)
    front = tree.expand({n: int(rng.integers(0, 3)) for n in front if not tree.nodes[n].done})
    for n in front:
      dense = np.asarray(full_forward(model, np.asarray([tree.path(n)], np.int32)))[0, -1]
      np.testing.assert_allclose(tree.nodes[n].logits, dense, atol=2e-4, rtol=2e-4)
  tree.close()
  assert tree.pool.pages_in_use == 0


def test_host_buffers_handed_to_the_device_are_never_written_afterwards(model, host_transfers):
  # On CPU the transfer may read a NumPy buffer after jnp.asarray / jnp.array returned (both
  # hand over the buffer itself), while the step it feeds is still dispatched: a later in-place
  # write (`live` cleared for rows that ended their step) reached the device at random, so those
  # rows kept stale logits and their children began from a wrong first token (whole bench cells
  # at accuracy 0). Every buffer the tree hands over (kvcache.host.to_device's private copies,
  # NumPy arguments of its jitted calls included) must keep the value it had then.
  import kvcache.host
  import search.tree
  seed = 107
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  rec = host_transfers
  rec.watch_jnp(search.tree, kvcache.host)
  rec.watch_calls(search.tree, "paged_decode_step", "paged_prefill", "_keep", "_sample")
  tree = _tree(model, seed)  # 21-token prompts, 8-token pages: steps cross a page boundary
  roots = [tree.root, tree.add_root(rng.integers(3, 50, 17).tolist())]
  front = tree.expand({r: 4 for r in roots})
  for _ in range(2):
    for n in front:
      if tree.nodes[n].done:
        tree.release(n)
    front = tree.expand({n: 2 for n in front if not tree.nodes[n].done})
  ends = [len(tree.nodes[n].tokens) for n in tree.nodes if tree.nodes[n].parent is not None]
  assert min(ends) < max(ends)  # some rows stopped before others (live was written)
  assert len(rec.handed) > 10
  written = rec.written()
  assert not written, f"{len(written)} of {len(rec.handed)} host buffers written after transfer"
  tree.close()
