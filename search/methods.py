"""Inference-time search over the paged tree: best-of-N, beam search, DVTS, REBASE and ETS.

One driver runs every method: at each depth the live leaves (unfinished solutions) are scored by
the process reward model in one batched call, the method decides how many children each gets
(0 = pruned, pages released), and all children generate their next step together
(search.tree.SearchTree.expand). Finished solutions are scored, kept as (answer, score) and
their pages released at once.

  best_of_n  N samples from the root, each continued alone to the end; weighted majority vote
  beam       keep the N / M best leaves by PRM score, M children each
  dvts       N / M independent subtrees, each a beam of width 1 with M children
             (diverse verifier tree search)
  rebase     REBASE: the remaining width (N minus the finished solutions) spread by a softmax
             of the scores at temperature 0.2 (search.rebase.allocate)
  ets        REBASE's shares, then the integer program that trades them against the nodes kept
             (KV) and the step clusters covered (search.ets.ets_allocate), the step
             embeddings clustered by average-linkage cosine distance (search.cluster)

    res = run_search(tree, scorer, SearchConfig("ets", width=16), answer_of=...)
    res.vote, res.best, res.kv["mean_pages"], res.ilp_s

Many problems at once in one pool (`run_searches`): every round, all searches that wait for
children expand in one batched generation and all fresh leaves are scored in one PRM call;
problems are admitted while the pool's free pages allow, so a method that holds less KV runs
more problems side by side (ETS's throughput claim).

    results, stats = run_searches(SearchTree(policy, None, ...), scorer, cfg,
                                  [(prompt, answer_of) for ...])
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import math
import multiprocessing
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from search.ets import ETSConfig, SelectionProblem, select_step, warm_up
from search.rebase import allocate
from search.tree import SearchTree

METHODS = ("best_of_n", "beam", "dvts", "rebase", "ets")


class Scorer(Protocol):
  """The process reward model as the search sees it."""

  def score(self, paths: Sequence[Sequence[int]]) -> np.ndarray:
    """[n] float scores in (0, 1) of the last step of each token path (prompt + steps)."""

  def embed(self, paths: Sequence[Sequence[int]], step_lengths: Sequence[int]) -> np.ndarray:
    """[n, D] an embedding of each path's last step (its last step_lengths[i] tokens)."""


def _score_embed(scorer: Scorer, paths, step_lengths) -> tuple[np.ndarray, np.ndarray]:
  """Scores and last-step embeddings: one pass where the scorer has `score_embed` (PRMScorer)."""
  both = getattr(scorer, "score_embed", None)
  if both is not None:
    return both(paths, step_lengths)
  return scorer.score(paths), scorer.embed(paths, step_lengths)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Attributes:
    method: one of METHODS.
    width: N, the number of solutions the search may finish (the beam width, the samples).
    children: M, children per kept leaf in beam search and DVTS.
    temperature: REBASE's softmax temperature over the scores.
    ets: the ETS program's settings (lambda_b, lambda_s, cluster distance, node cost).
  """

  method: str = "rebase"
  width: int = 16
  children: int = 4
  temperature: float = 0.2
  ets: ETSConfig = ETSConfig()

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown search method {self.method!r}; known: {', '.join(METHODS)}")
    if self.width < 1 or self.children < 1:
      raise ValueError(f"width and children must be >= 1, got {self.width}, {self.children}")
    if self.method in ("beam", "dvts") and self.width % self.children:
      raise ValueError(f"{self.method}: width {self.width} must be a multiple of children "
                       f"{self.children}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass
class SearchResult:
  """What one search found and what it cost."""

  solutions: list[tuple[str | None, float, list[int]]]  # (answer, PRM score, tokens)
  vote: str | None  # weighted majority (scores summed per answer)
  best: str | None  # the answer of the best-scored solution
  kv: dict  # SearchTree.kv_stats()
  model_calls: int
  prm_calls: int
  tokens_generated: int
  wall_s: float
  ilp_s: float  # ETS's step selection: clustering the step embeddings and the program
  depth: int


def _vote(solutions) -> tuple[str | None, str | None]:
  tally: dict[str, float] = defaultdict(float)
  for a, s, _ in solutions:
    if a is not None:
      tally[a] += s
  vote = max(tally, key=tally.get) if tally else None
  scored = [(s, a) for a, s, _ in solutions if a is not None]
  best = max(scored)[1] if scored else None
  return vote, best


def _problem(tree: SearchTree, leaves: list[int], labels: list[int]) -> SelectionProblem:
  """The program's tree: the leaves' ancestors below their root, numbered 0..N-1."""
  ids: dict[int, int] = {}
  paths = []
  for leaf in leaves:
    chain = []
    n = tree.nodes[leaf].parent
    while n is not None and tree.nodes[n].parent is not None:
      chain.append(n)
      n = tree.nodes[n].parent
    paths.append(tuple(ids.setdefault(a, len(ids)) for a in reversed(chain)))
  node_tokens = np.zeros(len(ids))
  for a, j in ids.items():
    node_tokens[j] = len(tree.nodes[a].tokens)
  return SelectionProblem(tuple(paths), np.asarray(labels),
                          leaf_tokens=np.asarray([len(tree.nodes[x].tokens) for x in leaves]),
                          node_tokens=node_tokens, num_nodes=len(ids))


class _Search:
  """One problem's search as a state machine the driver steps: `pending` (node -> children)
  waits for an expansion, `leaves` for their scores, `decide` turns scores into the next
  counts."""

  def __init__(self, tree: SearchTree, root: int, cfg: SearchConfig,
               answer_of: Callable[[list[int]], str | None], index: int):
    self.tree, self.root, self.cfg, self.answer_of, self.index = tree, root, cfg, answer_of, index
    self.solutions: list[tuple[str | None, float, list[int]]] = []
    self.subtree: dict[int, int] = {}
    first = cfg.width // cfg.children if cfg.method == "dvts" else cfg.width
    self.pending: dict[int, int] | None = {root: first}
    self.leaves: list[int] = []
    self.depth = 0
    self.ilp_s = 0.0
    self.prm_calls = 0
    self.calls0 = tree.model_calls  # the policy's calls while this search ran (shared ones too)
    self.t0 = time.perf_counter()

  def expanded(self, kids: list[int]) -> None:
    if self.cfg.method == "dvts":
      if self.depth == 0:
        self.subtree = {x: i for i, x in enumerate(kids)}
      else:
        for x in kids:
          self.subtree[x] = self.subtree[self.tree.nodes[x].parent]
    self.pending, self.leaves = None, kids
    self.depth += 1

  def settle(self, scores: np.ndarray) -> tuple[list[int], list[int], np.ndarray] | None:
    """Records the finished leaves (their pages released) and returns the live ones (node ids,
    rows in `scores`, their scores), or None when the search has ended. Then `counts` (or
    ETS's `selection`) and `assign` turn the scores into the next step's children."""
    tree, cfg = self.tree, self.cfg
    self.prm_calls += 1
    live, live_rows, live_scores = [], [], []
    for i, (x, s) in enumerate(zip(self.leaves, scores)):
      if tree.nodes[x].done:
        p = tree.path(x)
        self.solutions.append((self.answer_of(p), float(s), p))
        tree.release(x)
      else:
        live.append(x)
        live_rows.append(i)
        live_scores.append(s)
    self.leaves = []
    if not live or cfg.width - len(self.solutions) <= 0:
      for x in live:
        tree.release(x)
      return None
    return live, live_rows, np.asarray(live_scores, np.float64)

  def selection(self, live, embs: np.ndarray | None):
    """ETS: the arguments of search.ets.select_step for this step as a call (run it, or hand
    `.args` to a worker process); None for the other methods."""
    if self.cfg.method != "ets":
      return None
    nodes, rows, s = live
    # lambda_s by the search's width (the paper's presets), not by the width left.
    ets = dataclasses.replace(self.cfg.ets, temperature=self.cfg.temperature,
                              lambda_s=self.cfg.ets.lambda_s_at(self.cfg.width))
    problem = _problem(self.tree, nodes, [0] * len(nodes))  # labels: select_step clusters
    return functools.partial(select_step, s, np.asarray(embs)[rows], problem,
                             self.cfg.width - len(self.solutions), ets)

  def counts(self, live) -> list[int]:
    """Children per live leaf for the methods without a program (not ETS)."""
    cfg = self.cfg
    nodes, _, s = live
    left = cfg.width - len(self.solutions)
    if cfg.method == "best_of_n":
      return [1] * len(nodes)
    if cfg.method == "beam":
      keep = min(len(nodes), max(1, left // cfg.children))
      top = set(np.argsort(-s, kind="stable")[:keep].tolist())
      return [cfg.children if i in top else 0 for i in range(len(nodes))]
    if cfg.method == "dvts":
      best: dict[int, int] = {}
      for i, x in enumerate(nodes):
        g = self.subtree[x]
        if g not in best or s[i] > s[best[g]]:
          best[g] = i
      return [cfg.children if best.get(self.subtree[x]) == i else 0 for i, x in enumerate(nodes)]
    return allocate(s, left, cfg.temperature)  # rebase

  def assign(self, live, counts: Sequence[int], seconds: float = 0.0) -> None:
    """The step's children per live leaf -> `pending` (seconds: ETS's selection time)."""
    nodes, _, s = live
    self.ilp_s += seconds
    counts = list(counts)
    left = self.cfg.width - len(self.solutions)
    # No method finishes more than `width` solutions: trim the lowest-scored leaves' children.
    for i in np.argsort(s, kind="stable"):
      extra = sum(counts) - left
      if extra <= 0:
        break
      counts[i] -= min(counts[i], extra)
    self.pending = dict(zip(nodes, counts))

  @property
  def finished(self) -> bool:
    return self.pending is None and not self.leaves

  def result(self) -> SearchResult:
    vote, best = _vote(self.solutions)
    self.tree.close(self.root)
    return SearchResult(self.solutions, vote, best, self.tree.kv_stats(self.root),
                        self.tree.model_calls - self.calls0, self.prm_calls,
                        self.tree.tokens_by_root[self.root], time.perf_counter() - self.t0,
                        self.ilp_s, self.depth)


def _score(scorer: Scorer, searches: list[_Search], executor=None) -> float:
  """One PRM pass over the fresh leaves of every search (with step embeddings for ETS), then
  each search's next children. ETS's selections (clustering and program, one per search) run
  in `executor` (a concurrent.futures executor) when given and more than one search selects.
  Returns the wall seconds spent selecting."""
  tree = searches[0].tree
  leaves = [x for s in searches for x in s.leaves]
  paths = [tree.path(x) for x in leaves]
  if any(s.cfg.method == "ets" for s in searches):  # embeddings from the same pass
    scores, embs = _score_embed(scorer, paths, [len(tree.nodes[x].tokens) for x in leaves])
    embs = np.asarray(embs)
  else:
    scores, embs = scorer.score(paths), None
  scores = np.asarray(scores, np.float64)
  steps, i = [], 0
  for s in searches:
    j = i + len(s.leaves)
    live = s.settle(scores[i:j])
    if live is not None:
      steps.append((s, live, s.selection(live, None if embs is None else embs[i:j])))
    i = j
  t0 = time.perf_counter()
  jobs = [job for _, _, job in steps if job is not None]
  if executor is not None and len(jobs) > 1:
    futures = [executor.submit(job.func, *job.args) for job in jobs]
    chosen = iter([f.result() for f in futures])
  else:
    chosen = iter([job() for job in jobs])
  wall = time.perf_counter() - t0 if jobs else 0.0
  for s, live, job in steps:
    if job is None:
      s.assign(live, s.counts(live))
    else:
      s.assign(live, *next(chosen))
  return wall


_EXECUTORS: dict[int, concurrent.futures.ProcessPoolExecutor] = {}


def selection_workers(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """The process pool that runs ETS's selections (spawned once per size and kept for later
  runs, its workers' imports and solver set up before it is returned)."""
  if workers not in _EXECUTORS:
    ex = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))
    # Every worker solves one tiny program: imports and the solver's setup happen now.
    futures = [ex.submit(warm_up) for _ in range(workers)]
    for f in futures:
      f.result()
    _EXECUTORS[workers] = ex
  return _EXECUTORS[workers]


@atexit.register
def _shutdown_workers() -> None:
  for ex in _EXECUTORS.values():
    ex.shutdown(cancel_futures=True)
  _EXECUTORS.clear()


def default_workers() -> int:
  """Worker processes for ETS's per-search selections in run_searches: one per spare CPU core,
  at most 8 (1: no pool, the selections run in the driver)."""
  return max(1, min(8, (os.cpu_count() or 1) - 1))


def selection_worker_count(cfg: SearchConfig, n_jobs: int, workers: int | None = None) -> int:
  """The worker processes run_searches gives ETS's selections for n_jobs problems: `workers`
  (default default_workers()) where ETS searches more than one problem, else 1 (none)."""
  workers = default_workers() if workers is None else workers
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  return workers if cfg.method == "ets" and n_jobs > 1 else 1


@dataclasses.dataclass
class BatchStats:
  """What a run of several searches in one pool cost together.

  rounds: expansions run (each one batched generation for every search that expanded);
  model_calls, prm_calls: the policy's and the PRM's batched calls; mean_active, peak_active:
  searches holding pages per round; retracted: searches restarted when the pool ran short;
  peak_pages: the pool's high-water mark; wall_s: the run's wall time; ilp_s: the wall time the
  driver spent on ETS's selections (in parallel where a pool of workers ran them); ilp_cpu_s:
  those selections' own times summed."""

  rounds: int
  model_calls: int
  prm_calls: int
  mean_active: float
  peak_active: int
  retracted: int
  peak_pages: int
  wall_s: float
  ilp_s: float
  ilp_cpu_s: float = 0.0
  workers: int = 1


def run_searches(tree: SearchTree, scorer: Scorer, cfg: SearchConfig,
                 jobs: Sequence[tuple[Sequence[int], Callable[[list[int]], str | None]]],
                 max_active: int | None = None, workers: int | None = None
                 ) -> tuple[list[SearchResult], BatchStats]:
  """Searches many problems side by side in one page pool (tree: a SearchTree without roots
  or with finished ones; jobs: (prompt tokens, answer_of) per problem). Every round, all
  searches waiting for children expand in one batched generation and all fresh leaves are
  scored in one PRM call: problems share the policy's calls as a serving system batches
  requests, and how many run at once is bounded by the pool's pages.

  Scheduling, as a serving system does it (SGLang: admission by an estimate, retraction when
  decoding runs out of memory): a problem starts while the pages free, less what the running
  searches' next expansions are expected to take (expansion_pages at the mean step length so
  far), cover its prompt and its expected first expansion (and fewer than max_active run).
  Pages are taken as the steps reach them; when the pool runs dry inside a step, the newest
  search is retracted (its pages freed, its problem queued again from its prompt). So a method
  that holds fewer pages runs more problems at once. Results come back in the jobs' order.

  ETS's selections of one round (clustering and the program, one per search that selects) are
  independent: with workers > 1 (default: default_workers()) they run in that many worker
  processes (selection_workers: spawned once, NumPy/SciPy only), so the program's cost does not
  grow with the number of searches running at once.
  """
  if not jobs:
    raise ValueError("run_searches needs at least one job")
  if max_active is not None and max_active < 1:
    raise ValueError(f"max_active must be >= 1, got {max_active}")
  workers = selection_worker_count(cfg, len(jobs), workers)
  t0 = time.perf_counter()
  calls0 = tree.model_calls
  ps = tree.pool.page_size
  queue = list(range(len(jobs)))
  active: list[_Search] = []
  results: dict[int, SearchResult] = {}
  counters = {"rounds": 0, "retracted": 0, "prm_calls": 0, "peak_active": 0, "active_sum": 0}
  ilp, ilp_cpu = 0.0, 0.0
  first = cfg.width // cfg.children if cfg.method == "dvts" else cfg.width

  def start_need(i: int, step: int) -> int:
    n = len(jobs[i][0])
    return -(-n // ps) + first * (-(-(n + step) // ps) - n // ps)

  worst = max(start_need(i, tree.max_step_tokens) for i in queue)
  if worst > tree.pool.num_pages:
    raise ValueError(f"the pool's {tree.pool.num_pages} pages cannot hold one search's first "
                     f"expansion ({worst} pages at width {cfg.width}); give it more pages")

  def retract() -> int | None:
    if len(active) < 2:
      return None  # one search alone ran out: the pool is too small (OutOfPages)
    victim = active.pop()
    queue.insert(0, victim.index)
    counters["retracted"] += 1
    return victim.root

  tree.on_short = retract
  executor = None
  if workers > 1:
    try:
      executor = selection_workers(workers)
    except (OSError, RuntimeError) as e:  # no processes here (a sandbox, a broken pool)
      warnings.warn(f"ETS's selections run in the driver: worker processes failed ({e})",
                    stacklevel=2)
      workers = 1
  try:
    while queue or active:
      # Admit while the free pages cover the running searches' expected next step and the
      # newcomer's expected start.
      step = max(1, math.ceil(tree.mean_step_tokens()))
      while queue and (max_active is None or len(active) < max_active):
        expected = sum(tree.expansion_pages(s.pending, step) for s in active if s.pending)
        if active and tree.pool.free_pages - expected < start_need(queue[0], step):
          break
        i = queue.pop(0)
        active.append(_Search(tree, tree.add_root(jobs[i][0]), cfg, jobs[i][1], i))
      batch: dict[int, int] = {}
      taken = [s for s in active if s.pending is not None]
      for s in taken:
        batch.update(s.pending)
      if batch:
        counters["rounds"] += 1
        counters["active_sum"] += len(active)
        counters["peak_active"] = max(counters["peak_active"], len(active))
        kids = tree.expand(batch)  # may retract the newest searches (retract above)
        by_parent: dict[int, list[int]] = {}
        for x in kids:
          by_parent.setdefault(tree.nodes[x].parent, []).append(x)
        for s in taken:
          if s in active:
            s.expanded([x for n in s.pending for x in by_parent.get(n, [])])
      fresh = [s for s in active if s.leaves]
      if fresh:
        ilp += _score(scorer, fresh, executor)
        counters["prm_calls"] += 1
      for s in [s for s in active if s.finished]:
        active.remove(s)
        ilp_cpu += s.ilp_s
        results[s.index] = s.result()
  finally:
    tree.on_short = None
  c = counters
  stats = BatchStats(c["rounds"], tree.model_calls - calls0, c["prm_calls"],
                     c["active_sum"] / max(c["rounds"], 1), c["peak_active"], c["retracted"],
                     tree.pool.peak_pages, time.perf_counter() - t0, ilp, ilp_cpu, workers)
  return [results[i] for i in range(len(jobs))], stats


def run_search(tree: SearchTree, scorer: Scorer, cfg: SearchConfig,
               answer_of: Callable[[list[int]], str | None]) -> SearchResult:
  """Searches from the tree's root until `width` solutions finished or no leaf is left.

  answer_of(path tokens) -> the answer a finished solution gives (None: none parsed).
  """
  s = _Search(tree, tree.root, cfg, answer_of, 0)
  while not s.finished:
    if s.pending is not None:
      s.expanded(tree.expand(s.pending))
    if s.leaves:
      _score(scorer, [s])
  return s.result()
