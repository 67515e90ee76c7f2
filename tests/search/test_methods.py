"""Every search method end to end on a tiny random policy with a deterministic stand-in scorer:
the width is respected, every page is freed at the end, votes come from the finished solutions,
ETS spends time in its program and keeps no more pages than REBASE on the same tree; bad configs
are one-line errors."""

import zlib

import numpy as np
import pytest

from colm.config import ModelConfig
from kvcache.sampling import SamplingConfig
from search import methods
from search.methods import METHODS, SearchConfig, run_search, run_searches
from search.tree import SearchTree


class HashScorer:
  """Scores and embeddings that are fixed functions of the tokens (no model)."""

  def score(self, paths):
    return np.asarray([(zlib.crc32(bytes(str(p), "ascii")) % 1000) / 1000 for p in paths])

  def embed(self, paths, step_lengths):
    out = []
    for p, n in zip(paths, step_lengths):
      rng = np.random.default_rng(zlib.crc32(bytes(str(p[-n:][:1]), "ascii")))
      out.append(rng.standard_normal(8))
    return np.stack(out)


@pytest.fixture(scope="module")
def model(spread_decoder):
  return spread_decoder(ModelConfig.tiny(max_seq_len=256, n_kv_heads=2, n_heads=4, n_layers=2),
                        12)


def _tree(model, seed):
  prompt = np.random.default_rng(seed).integers(3, model.cfg.vocab_size, 17).tolist()
  return SearchTree(model, prompt, step_token=1, stop_tokens=[2], page_size=8, num_pages=1024,
                    max_step_tokens=4, max_depth=3, sampling=SamplingConfig(temperature=1.0),
                    seed=seed)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_frees_its_pages(model, method):
  seed = 111
  print(f"seed={seed}")
  tree = _tree(model, seed)
  res = run_search(tree, HashScorer(), SearchConfig(method, width=8, children=2),
                   answer_of=lambda p: str(p[-2] % 3))
  assert tree.pool.pages_in_use == 0
  assert 1 <= len(res.solutions) <= 8
  if method in ("best_of_n", "rebase"):
    assert len(res.solutions) == 8
  answers = {a for a, _, _ in res.solutions}
  assert res.vote in answers and res.best in answers
  assert res.kv["peak_pages"] >= res.kv["mean_pages"] > 0
  assert res.model_calls > 1 and res.prm_calls >= 1 and res.tokens_generated > 0
  assert (res.ilp_s > 0) == (method == "ets")


def test_ets_prunes_at_least_as_hard_as_rebase(model):
  seed = 112
  print(f"seed={seed}")
  kv = {}
  for method in ("rebase", "ets"):
    res = run_search(_tree(model, seed), HashScorer(),
                     SearchConfig(method, width=8, ets=SearchConfig().ets.__class__(lambda_b=4.0)),
                     answer_of=lambda p: str(p[-1]))
    kv[method] = res.kv["mean_pages_no_prompt"]
  assert kv["ets"] <= kv["rebase"]


def test_bad_configs_are_one_line_errors():
  with pytest.raises(ValueError, match="unknown search method"):
    SearchConfig("mcts")
  with pytest.raises(ValueError, match="width"):
    SearchConfig("rebase", width=0)
  with pytest.raises(ValueError, match="multiple"):
    SearchConfig("beam", width=6, children=4)


def _jobs(model, seed, n):
  rng = np.random.default_rng(seed)
  return [(rng.integers(3, model.cfg.vocab_size, int(rng.integers(9, 30))).tolist(),
           lambda p: str(p[-2] % 3)) for _ in range(n)]


def _pool(model, seed, num_pages, prompt=None, page_size=8):
  return SearchTree(model, prompt, step_token=1, stop_tokens=[2], page_size=page_size,
                    num_pages=num_pages, max_step_tokens=4, max_depth=3,
                    sampling=SamplingConfig(temperature=1.0), seed=seed)


@pytest.mark.parametrize("method", ["rebase", "ets", "dvts"])
def test_many_searches_share_one_pool_and_its_calls(model, method):
  seed = 113
  print(f"seed={seed}")
  cfg = SearchConfig(method, width=8, children=2)
  jobs = _jobs(model, seed, 5)
  tree = _pool(model, seed, 2048)
  results, stats = run_searches(tree, HashScorer(), cfg, jobs)
  assert len(results) == 5 and tree.pool.pages_in_use == 0
  assert stats.peak_active == 5 and stats.retracted == 0  # a large pool runs all at once
  for r in results:
    assert 1 <= len(r.solutions) <= 8
    assert r.kv["peak_pages"] >= r.kv["mean_pages"] > 0
  # The problems shared the policy's calls: fewer than searching them one by one.
  alone = 0
  for prompt, answer_of in jobs:
    alone += run_search(_pool(model, seed, 2048, prompt), HashScorer(), cfg,
                        answer_of).model_calls
  assert stats.model_calls < alone


def test_ets_selections_in_worker_processes_change_nothing(model):
  # The round's selections in two spawned worker processes: the same children, hence the same
  # searches, as in the driver; the pool of workers is reported and shut down.
  seed = 117
  print(f"seed={seed}")
  cfg = SearchConfig("ets", width=8)
  jobs = _jobs(model, seed, 4)
  try:
    runs = [run_searches(_pool(model, seed, 2048), HashScorer(), cfg, jobs, workers=w)
            for w in (1, 2)]
  finally:
    methods._shutdown_workers()  # the processes end with the test, not at interpreter exit
  assert not methods._EXECUTORS
  (one, s1), (two, s2) = runs
  assert (s1.workers, s2.workers) == (1, 2)
  assert s2.ilp_cpu_s > 0 and s2.ilp_s > 0
  for a, b in zip(one, two):
    assert a.solutions == b.solutions and a.kv == b.kv and a.depth == b.depth
  with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
    run_searches(_pool(model, seed, 2048), HashScorer(), cfg, jobs, workers=0)


def test_ets_selections_fall_back_to_the_driver_without_processes(model, monkeypatch):
  seed = 118
  print(f"seed={seed}")

  def no_processes(workers):
    raise OSError("no /dev/shm")
  monkeypatch.setattr(methods, "selection_workers", no_processes)
  with pytest.warns(UserWarning, match="worker processes failed"):
    results, stats = run_searches(_pool(model, seed, 2048), HashScorer(),
                                  SearchConfig("ets", width=8), _jobs(model, seed, 2), workers=4)
  assert stats.workers == 1 and all(r.solutions for r in results)


def test_a_small_pool_runs_searches_a_few_at_a_time(model):
  seed = 114
  print(f"seed={seed}")
  cfg = SearchConfig("rebase", width=8)
  tree = _pool(model, seed, 64)
  results, stats = run_searches(tree, HashScorer(), cfg, _jobs(model, seed, 6))
  assert len(results) == 6 and all(r.solutions for r in results)
  assert stats.peak_pages <= 64 and tree.pool.pages_in_use == 0
  assert 1 <= stats.peak_active < 6
  # The pool ran dry inside a step: the newest search was retracted and rerun to the end.
  assert stats.retracted >= 1 and tree.on_short is None
  with pytest.raises(ValueError, match="cannot hold one search"):
    run_searches(_pool(model, seed, 8), HashScorer(), cfg, _jobs(model, seed, 2))
  with pytest.raises(ValueError, match="max_active"):
    run_searches(tree, HashScorer(), cfg, _jobs(model, seed, 2), max_active=0)


@pytest.mark.parametrize("page_size", [8, 1])
def test_searches_side_by_side_keep_every_step_exact(model, full_forward, page_size):
  # Every node the searches generated (retracted roots' included) holds the logits a dense
  # forward gives after its path: the next step's first token is drawn from the right place.
  # (A host buffer written after its transfer once left rows that ended a step with stale
  # logits, at random: bench cells at accuracy 0; see test_tree's host-buffer test.)
  seed = 115
  print(f"seed={seed}")
  jobs = _jobs(model, seed, 6)
  # small (320 tokens): searches are retracted and rerun; page 1 as SGLang's radix cache
  tree = _pool(model, seed, 320 // page_size, page_size=page_size)
  results, stats = run_searches(tree, HashScorer(), SearchConfig("rebase", width=8), jobs)
  assert stats.retracted >= 1 and all(len(r.solutions) == 8 for r in results)
  for (prompt, _), r in zip(jobs, results):
    assert all(path[:len(prompt)] == prompt for _, _, path in r.solutions)
  ids = [i for i, n in tree.nodes.items() if n.parent is not None and n.logits is not None]
  paths = [tree.path(i) for i in ids]
  tokens = np.zeros((len(paths), max(map(len, paths))), np.int32)
  for row, p in enumerate(paths):
    tokens[row, :len(p)] = p  # right-padded: causal, so the padding changes nothing before it
  dense = full_forward(model, tokens)
  for row, (i, p) in enumerate(zip(ids, paths)):
    np.testing.assert_allclose(tree.nodes[i].logits, dense[row, len(p) - 1], atol=2e-4,
                               rtol=2e-4, err_msg=f"node {i}")
