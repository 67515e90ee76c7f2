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
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from search.cluster import cluster
from search.ets import ETSConfig, SelectionProblem, ets_allocate
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
  """The program's tree: the leaves' ancestors below the root, numbered 0..N-1."""
  ids: dict[int, int] = {}
  paths = []
  for leaf in leaves:
    chain = []
    n = tree.nodes[leaf].parent
    while n is not None and n != tree.root:
      chain.append(n)
      n = tree.nodes[n].parent
    paths.append(tuple(ids.setdefault(a, len(ids)) for a in reversed(chain)))
  node_tokens = np.zeros(len(ids))
  for a, j in ids.items():
    node_tokens[j] = len(tree.nodes[a].tokens)
  return SelectionProblem(tuple(paths), np.asarray(labels),
                          leaf_tokens=np.asarray([len(tree.nodes[x].tokens) for x in leaves]),
                          node_tokens=node_tokens, num_nodes=len(ids))


def run_search(tree: SearchTree, scorer: Scorer, cfg: SearchConfig,
               answer_of: Callable[[list[int]], str | None]) -> SearchResult:
  """Searches from the tree's root until `width` solutions finished or no leaf is left.

  answer_of(path tokens) -> the answer a finished solution gives (None: none parsed).
  """
  t0 = time.perf_counter()
  ilp_s = 0.0
  prm_calls = 0
  solutions: list[tuple[str | None, float, list[int]]] = []
  subtree: dict[int, int] = {}
  first = cfg.width // cfg.children if cfg.method == "dvts" else cfg.width
  leaves = tree.expand({tree.root: first})
  if cfg.method == "dvts":
    subtree = {leaf: i for i, leaf in enumerate(leaves)}
  depth = 1
  while leaves:
    paths = [tree.path(x) for x in leaves]
    if cfg.method == "ets":  # the step embeddings come from the same PRM pass as the scores
      scores, embs = _score_embed(scorer, paths, [len(tree.nodes[x].tokens) for x in leaves])
    else:
      scores, embs = scorer.score(paths), None
    scores = np.asarray(scores, np.float64)
    prm_calls += 1
    live, live_embs, live_scores = [], [], []
    for i, (x, p, s) in enumerate(zip(leaves, paths, scores)):
      if tree.nodes[x].done:
        solutions.append((answer_of(p), float(s), p))
        tree.release(x)
      else:
        live.append(x)
        live_embs.append(i)
        live_scores.append(s)
    left = cfg.width - len(solutions)
    if not live or left <= 0:
      for x in live:
        tree.release(x)
      break
    s = np.asarray(live_scores)
    if cfg.method == "best_of_n":
      counts = [1] * len(live)
    elif cfg.method == "beam":
      keep = min(len(live), max(1, left // cfg.children))
      top = set(np.argsort(-s, kind="stable")[:keep].tolist())
      counts = [cfg.children if i in top else 0 for i in range(len(live))]
    elif cfg.method == "dvts":
      best: dict[int, int] = {}
      for i, x in enumerate(live):
        g = subtree[x]
        if g not in best or s[i] > s[best[g]]:
          best[g] = i
      counts = [cfg.children if best.get(subtree[x]) == i else 0 for i, x in enumerate(live)]
    elif cfg.method == "rebase":
      counts = allocate(s, left, cfg.temperature)
    else:  # ets
      t1 = time.perf_counter()
      labels = cluster(np.asarray(embs)[live_embs], cfg.ets.cluster_distance)
      # lambda_s by the search's width (the paper's presets), not by the width left.
      ets = dataclasses.replace(cfg.ets, temperature=cfg.temperature,
                                lambda_s=cfg.ets.lambda_s_at(cfg.width))
      counts = ets_allocate(s, _problem(tree, live, labels), left, ets)
      ilp_s += time.perf_counter() - t1
    counts = list(counts)
    # No method finishes more than `width` solutions: trim the lowest-scored leaves' children.
    for i in np.argsort(s, kind="stable"):
      extra = sum(counts) - left
      if extra <= 0:
        break
      counts[i] -= min(counts[i], extra)
    new = tree.expand(dict(zip(live, counts)))
    if cfg.method == "dvts":
      for x in new:
        subtree[x] = subtree[tree.nodes[x].parent]
    leaves = new
    depth += 1
  vote, best_answer = _vote(solutions)
  tree.close()
  return SearchResult(solutions, vote, best_answer, tree.kv_stats(), tree.model_calls, prm_calls,
                      tree.tokens_generated, time.perf_counter() - t0, ilp_s, depth)
