"""ETS: REBASE's expansion pruned at every step by an integer program trading the kept
candidates' reward share against the KV cache their paths hold and the semantic clusters they
cover (Hooper et al., "ETS: Efficient Tree Search for Inference-Time Scaling", arXiv
2502.13575, Sec. 4; SqueezeAILab/ETS rebase.py `select_softmax_costmodel`).

Per step, with M candidates (the new leaves), N ancestor nodes (their paths, the root/prompt
excluded) and K clusters, over booleans x_i (keep candidate i), y_j (keep node j), c_k (cover
cluster k):

  max  sum_i O_i x_i - lambda_b / (M + N) (sum_j b_j y_j + sum_i a_i x_i) + lambda_s / K sum_k c_k
  s.t. x_i <= y_j for each ancestor j of i;  y_j <= sum of x over the leaves under j;
       sum_i x_i >= 1;  c_k <= sum_{i in C_k} x_i,

O_i = candidate i's REBASE share (its children / width), a = b = 1 for node_cost "uniform", or
each node's token count over the mean token count of all M + N nodes for "tokens" (so uniform
counts give the uniform program). Then REBASE's allocation reruns over the kept candidates.

Axes: M candidates, N ancestor nodes, K clusters.

  python -m search.ets   # times solve on a width-256-like problem
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from search.cluster import cluster
from search.rebase import allocate

# lambda_s of the paper's MATH500 runs by width (SqueezeAILab/ETS hype-parameters/).
LAMBDA_S = {16: 1.5, 64: 1.4, 256: 1.45}
NODE_COSTS = ("uniform", "tokens")
# solve_brute enumerates 2^M - 1 subsets.
BRUTE_MAX = 16


@dataclasses.dataclass(frozen=True, slots=True)
class ETSConfig:
  """ETS's step selection; defaults are the paper's."""
  lambda_b: float = 1.0  # weight of the KV-cache (node) cost, >= 0
  lambda_s: float | None = None  # weight of cluster coverage, >= 0; None: LAMBDA_S by width
  cluster_distance: float = 0.05  # average-linkage cosine cut for search.cluster.cluster
  temperature: float = 0.2  # REBASE's softmax temperature
  node_cost: str = "uniform"  # "uniform": every node costs 1; "tokens": its token count

  def __post_init__(self):
    if not self.lambda_b >= 0:
      raise ValueError(f"lambda_b must be >= 0, got {self.lambda_b!r}")
    if self.lambda_s is not None and not self.lambda_s >= 0:
      raise ValueError(f"lambda_s must be >= 0 or None, got {self.lambda_s!r}")
    if not self.cluster_distance >= 0:
      raise ValueError(f"cluster_distance must be >= 0, got {self.cluster_distance!r}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
    if self.node_cost not in NODE_COSTS:
      raise ValueError(f"node_cost must be one of {NODE_COSTS}, got {self.node_cost!r}")

  def lambda_s_at(self, width: int) -> float:
    """lambda_s, or the preset of the width nearest `width` in log2 (ties to the smaller)."""
    if self.lambda_s is not None:
      return float(self.lambda_s)
    if width < 1:
      raise ValueError(f"width must be >= 1, got {width!r}")
    near = min(LAMBDA_S, key=lambda w: (abs(math.log2(w) - math.log2(width)), w))
    return LAMBDA_S[near]


def _ints(a, name: str, n: int | None = None) -> np.ndarray:
  v = np.asarray(a)
  if v.ndim != 1 or (n is not None and v.size != n):
    raise ValueError(f"{name} must be 1-D of length {n}, got shape {v.shape}")
  return v


@dataclasses.dataclass(frozen=True)
class SelectionProblem:
  """One step's candidates and the tree above them.

  Attributes:
    paths: M tuples of ancestor node ids in [0, N), from the top (a child of the root) down to
      the candidate's parent, the root/prompt excluded (empty for a child of the root); every
      id 0..N-1 lies on some path, and the paths agree on each node's parent (a tree).
    labels: [M] int cluster label of each candidate's step (any ints; K = distinct labels).
    shares: [M] float O_i, REBASE's share of candidate i; None until ets_allocate fills it.
    leaf_tokens: [M] token count of each candidate's step (node_cost "tokens").
    node_tokens: [N] token count of each ancestor node's step (node_cost "tokens").
    num_nodes: N; None: 1 + the largest id on the paths (or len(node_tokens)).
  """
  paths: tuple[tuple[int, ...], ...]
  labels: np.ndarray
  shares: np.ndarray | None = None
  leaf_tokens: np.ndarray | None = None
  node_tokens: np.ndarray | None = None
  num_nodes: int | None = None

  def __post_init__(self):
    paths = tuple(tuple(int(j) for j in p) for p in self.paths)
    m = len(paths)
    if m == 0:
      raise ValueError("a selection problem needs at least one candidate")
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("paths", paths)
    set_("labels", _ints(self.labels, "labels", m).astype(np.int64))
    if self.shares is not None:
      s = _ints(self.shares, "shares", m).astype(np.float64)
      if not np.all(np.isfinite(s)):
        raise ValueError(f"shares must be finite, got {s.tolist()}")
      set_("shares", s)
    used = sorted({j for p in paths for j in p})
    n = self.num_nodes
    if n is None:
      n = len(self.node_tokens) if self.node_tokens is not None else (used[-1] + 1 if used else 0)
    set_("num_nodes", int(n))
    if used and (used[0] < 0 or used[-1] >= n):
      raise ValueError(f"ancestor ids must lie in [0, {n}), got {used[0]}..{used[-1]}")
    if len(used) != n:
      missing = sorted(set(range(n)) - set(used))[:5]
      raise ValueError(f"every node 0..{n - 1} must be some candidate's ancestor; "
                       f"{missing} are on no path")
    _node_parents(paths, n)  # raises unless the paths describe a tree
    for name, k in (("leaf_tokens", m), ("node_tokens", n)):
      t = getattr(self, name)
      if t is not None:
        t = _ints(t, name, k).astype(np.float64)
        if not np.all(np.isfinite(t) & (t >= 0)):
          raise ValueError(f"{name} must be finite and >= 0")
        set_(name, t)

  @classmethod
  def from_parents(cls, parents: Sequence[int], leaf_parents: Sequence[int],
                   labels: Sequence[int], **fields) -> SelectionProblem:
    """The problem of a tree given by parent pointers.

    Args:
      parents: [N] parent node of each ancestor node, -1 for a child of the root.
      leaf_parents: [M] parent node of each candidate, -1 for a child of the root.
      labels: [M] cluster labels.
      **fields: shares, leaf_tokens, node_tokens.
    """
    n = len(parents)
    paths = []
    for p in leaf_parents:
      path = []
      while p != -1:
        if not 0 <= p < n or len(path) > n:
          raise ValueError(f"parent pointers must stay in [-1, {n}) and be acyclic")
        path.append(int(p))
        p = parents[p]
      paths.append(tuple(reversed(path)))
    return cls(tuple(paths), np.asarray(labels), num_nodes=n, **fields)

  @property
  def num_candidates(self) -> int:
    return len(self.paths)


@dataclasses.dataclass(frozen=True)
class Selection:
  """What one step keeps."""
  kept: tuple[int, ...]  # kept candidate indices, ascending
  ancestors: tuple[int, ...]  # kept ancestor node ids (the kept candidates' paths), ascending
  clusters: tuple[int, ...]  # covered cluster indices (0..K-1 in sorted-label order)
  objective: float  # the program's value at this selection
  seconds: float  # wall time of building and solving


@dataclasses.dataclass(frozen=True)
class _Program:
  """The program's coefficients: maximise gain @ x - cost @ y + cover * sum(c)."""
  gain: np.ndarray  # [M] O_i - lambda_b / (M + N) a_i
  cost: np.ndarray  # [N] lambda_b / (M + N) b_j
  cover: float  # lambda_s / K
  incidence: np.ndarray  # [M, N] bool: node j is an ancestor of candidate i
  member: np.ndarray  # [M, K] bool: candidate i is in cluster k


def _program(problem: SelectionProblem, cfg: ETSConfig, width: int | None) -> _Program:
  if problem.shares is None:
    raise ValueError("problem.shares is None: set O_i (ets_allocate does) before solving")
  m, n = problem.num_candidates, problem.num_nodes
  if cfg.node_cost == "tokens":
    if problem.leaf_tokens is None or problem.node_tokens is None:
      raise ValueError('node_cost "tokens" needs leaf_tokens and node_tokens')
    mean = (problem.leaf_tokens.sum() + problem.node_tokens.sum()) / (m + n)
    if not mean > 0:
      raise ValueError('node_cost "tokens" needs a positive total token count')
    a, b = problem.leaf_tokens / mean, problem.node_tokens / mean
  else:
    a, b = np.ones(m), np.ones(n)
  scale = cfg.lambda_b / (m + n)
  incidence = np.zeros((m, n), bool)
  for i, p in enumerate(problem.paths):
    incidence[i, list(p)] = True
  _, k = np.unique(problem.labels, return_inverse=True)
  member = np.zeros((m, k.max() + 1), bool)
  member[np.arange(m), k] = True
  cover = cfg.lambda_s_at(m if width is None else width) / member.shape[1]
  return _Program(problem.shares - scale * a, scale * b, cover, incidence, member)


def _selection(prog: _Program, x: np.ndarray, start: float) -> Selection:
  """The selection of keep-mask x [M] (y and c follow from x: a node is kept iff a kept leaf
  lies under it, a cluster covered iff it holds a kept leaf)."""
  y, c = prog.incidence[x].any(0), prog.member[x].any(0)
  value = prog.gain[x].sum() - prog.cost[y].sum() + prog.cover * c.sum()
  return Selection(tuple(np.flatnonzero(x).tolist()), tuple(np.flatnonzero(y).tolist()),
                   tuple(np.flatnonzero(c).tolist()), float(value), time.perf_counter() - start)


def solve_brute(problem: SelectionProblem, cfg: ETSConfig, width: int | None = None) -> Selection:
  """The program's optimum by enumerating every non-empty candidate subset (M <= 16), for tests
  and where cvxpy is missing; `width` picks the default lambda_s (M when None). Of tied optima
  it returns the first in binary order of the keep masks (candidate 0 the lowest bit)."""
  start = time.perf_counter()
  m = problem.num_candidates
  if m > BRUTE_MAX:
    raise ValueError(f"solve_brute enumerates 2^M subsets: M = {m} > {BRUTE_MAX}")
  prog = _program(problem, cfg, width)
  masks = (np.arange(1, 2 ** m)[:, None] >> np.arange(m)) & 1  # [2^M - 1, M]
  y = masks @ prog.incidence.astype(np.int64) > 0
  c = masks @ prog.member.astype(np.int64) > 0
  value = masks @ prog.gain - y @ prog.cost + prog.cover * c.sum(1)
  return _selection(prog, masks[int(np.argmax(value))].astype(bool), start)


def _cvxpy():
  try:
    import cvxpy as cp
  except ImportError as e:
    raise ImportError("search.ets.solve needs cvxpy: pip install cvxpy highspy") from e
  if cp.HIGHS not in cp.installed_solvers():
    raise ImportError("search.ets.solve needs cvxpy's HiGHS solver: pip install highspy")
  return cp


def solver_name() -> str:
  """Which backend `solve` uses above M = 16 here: "cvxpy+HiGHS", else "scipy.milp+HiGHS"."""
  try:
    _cvxpy()
    return "cvxpy+HiGHS"
  except ImportError:
    return "scipy.milp+HiGHS"


def solve(problem: SelectionProblem, cfg: ETSConfig, width: int | None = None) -> Selection:
  """The program's optimum by HiGHS's MILP solver through cvxpy (boolean x, y, c).

  Args:
    problem: shares, paths, labels (and token counts for node_cost "tokens").
    cfg: lambdas and node cost.
    width: the search width, which picks the default lambda_s (M when None).
  Returns:
    the Selection; y and c are read off x (the constraints force y, and c is free only where it
    is worth nothing), and the objective recomputed from them in float64.
  Raises:
    ImportError naming the package when cvxpy or highspy is missing, M > 16 and SciPy lacks
    HiGHS (up to M = 16 it falls back to solve_brute, above that to solve_scipy, the same
    HiGHS MILP through scipy.optimize.milp); RuntimeError if HiGHS reports no optimum.
  """
  try:
    cp = _cvxpy()
  except ImportError:
    if problem.num_candidates <= BRUTE_MAX:
      return solve_brute(problem, cfg, width)
    try:
      return solve_scipy(problem, cfg, width)
    except ImportError:
      pass
    raise
  start = time.perf_counter()
  prog = _program(problem, cfg, width)
  value, a, lower, upper = _milp_form(problem, prog)
  z = cp.Variable(value.size, boolean=True)  # [x (M), y (N), c (K)]
  lo, up = np.isfinite(lower), np.isfinite(upper)
  cons = [a[lo] @ z >= lower[lo], a[up] @ z <= upper[up]]
  objective = value @ z
  program = cp.Problem(cp.Maximize(objective), cons)
  # Zero gaps: tests compare against solve_brute, and these programs solve at the root anyway.
  program.solve(solver=cp.HIGHS, mip_rel_gap=0.0, mip_abs_gap=1e-9)
  if program.status != cp.OPTIMAL:
    raise RuntimeError(f"HiGHS returned status {program.status!r} for the ETS program")
  return _selection(prog, np.asarray(z.value[:prog.gain.size]) > 0.5, start)


def solve_scipy(problem: SelectionProblem, cfg: ETSConfig, width: int | None = None
                ) -> Selection:
  """The program's optimum by HiGHS's MILP solver through scipy.optimize.milp (SciPy >= 1.9),
  over z = [x (M), y (N), c (K)]: `solve` without cvxpy, the same answer (tests)."""
  try:
    from scipy.optimize import Bounds, LinearConstraint, milp
  except ImportError as e:
    raise ImportError("search.ets.solve_scipy needs scipy >= 1.9 (scipy.optimize.milp)") from e
  start = time.perf_counter()
  prog = _program(problem, cfg, width)
  m = prog.gain.size
  value, a, lower, upper = _milp_form(problem, prog)
  objective, size = -value, value.size  # milp minimises
  cons = LinearConstraint(a, lower, upper)
  # The LP relaxation first: over these trees it is mostly integral, and an integral LP optimum
  # is the program's optimum; else the MILP.
  lp = milp(objective, constraints=cons, integrality=np.zeros(size), bounds=Bounds(0, 1))
  if lp.status == 0 and lp.x is not None:
    x = np.asarray(lp.x[:m]) > 0.5
    if x.any() and np.abs(lp.x - np.round(lp.x)).max() <= 1e-9:
      sel = _selection(prog, x, start)
      if abs(sel.objective + lp.fun) <= 1e-9 * max(1.0, abs(lp.fun)):
        return sel
  res = milp(objective, constraints=cons, integrality=np.ones(size), bounds=Bounds(0, 1),
             options={"mip_rel_gap": 0.0})
  if res.status != 0 or res.x is None:
    raise RuntimeError(f"HiGHS (scipy.optimize.milp) returned status {res.status}: {res.message}")
  return _selection(prog, np.asarray(res.x[:m]) > 0.5, start)


def _node_parents(paths: Sequence[tuple[int, ...]], n: int) -> np.ndarray:
  """[N] parent node of each ancestor node (-1: under the root) from top-first paths; a
  ValueError where two paths disagree on a node's parent."""
  parent = np.full(n, -2, np.int64)  # -2: not seen yet
  for p in paths:
    for above, j in zip((-1,) + p[:-1], p):
      if parent[j] == -2:
        parent[j] = above
      elif parent[j] != above:
        raise ValueError(f"the paths disagree on node {j}'s parent ({parent[j]} and {above}): "
                         f"they must describe a tree, top first")
  return parent


def _parents(problem: SelectionProblem) -> tuple[np.ndarray, np.ndarray]:
  """(parent node of each candidate [M], of each ancestor node [N]; -1: under the root)."""
  leaf_parent = np.array([path[-1] if path else -1 for path in problem.paths], np.int64)
  return leaf_parent, _node_parents(problem.paths, problem.num_nodes)


def _milp_form(problem: SelectionProblem, prog: _Program):
  """The program over z = [x (M), y (N), c (K)], as both solvers take it: (value [M + N + K],
  sparse A, lower, upper), maximise value @ z subject to lower <= A z <= upper: sum x >= 1;
  c_k <= sum_{i in C_k} x_i; x_i <= y_parent(i) and y_j <= y_parent(j) (with the parents'
  chains these imply x_i <= y_j for every ancestor j). y_j <= sum of the leaves under j is left
  out: y costs lambda_b / (M + N) b_j >= 0, so an optimum never keeps a node without a kept leaf
  where that costs anything, and the Selection reads y off x in any case."""
  import scipy.sparse as sp
  m, n = prog.incidence.shape
  k = prog.member.shape[1]
  leaf_parent, node_parent = _parents(problem)
  li, ni = np.flatnonzero(leaf_parent >= 0), np.flatnonzero(node_parent >= 0)
  mi, mk = np.nonzero(prog.member)
  r_cov, r_leaf, r_node = 1, 1 + k, 1 + k + li.size
  rows = np.concatenate([np.zeros(m), r_cov + mk, r_cov + np.arange(k), r_leaf + np.arange(li.size),
                         r_leaf + np.arange(li.size), r_node + np.arange(ni.size),
                         r_node + np.arange(ni.size)])
  cols = np.concatenate([np.arange(m), mi, m + n + np.arange(k), li, m + leaf_parent[li],
                         m + ni, m + node_parent[ni]])
  vals = np.concatenate([np.ones(m), -np.ones(mi.size), np.ones(k), np.ones(li.size),
                         -np.ones(li.size), np.ones(ni.size), -np.ones(ni.size)])
  n_rows = r_node + ni.size
  a = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, m + n + k))
  lower = np.r_[1.0, np.full(n_rows - 1, -np.inf)]
  upper = np.r_[np.inf, np.zeros(n_rows - 1)]
  value = np.concatenate([prog.gain, -prog.cost, np.full(k, prog.cover)])
  return value, a, lower, upper


def ets_allocate(scores: Sequence[float] | np.ndarray, problem: SelectionProblem, width: int,
                 cfg: ETSConfig = ETSConfig()) -> list[int]:
  """ETS's children per candidate for one step.

  O_i = REBASE's allocation of `width` over all candidates, divided by width (the released
  code's `outcome_score`); the program keeps a subset; REBASE's allocation of `width` reruns
  over the kept candidates' scores alone.

  Args:
    scores: [M] float process-reward scores of the candidates.
    problem: the step's tree and clusters; its shares are replaced by O.
    width: children to hand out this step (the remaining width), >= 1.
    cfg: ETSConfig.
  Returns:
    [M] int counts summing to width, 0 for candidates the program (or the rerun) pruned.
  """
  s = np.asarray(scores, np.float64)
  if s.ndim != 1 or s.size != problem.num_candidates:
    raise ValueError(f"scores must be [{problem.num_candidates}], got shape {s.shape}")
  share = np.asarray(allocate(s, width, cfg.temperature), np.float64) / width
  sel = solve(dataclasses.replace(problem, shares=share), cfg, width)
  counts = [0] * s.size
  for i, k in zip(sel.kept, allocate(s[list(sel.kept)], width, cfg.temperature)):
    counts[i] = k
  return counts


def select_step(scores: np.ndarray, embeddings: np.ndarray, problem: SelectionProblem,
                width: int, cfg: ETSConfig) -> tuple[list[int], float]:
  """One search step's whole selection: the candidates' step embeddings [M, D] clustered
  (search.cluster, cfg.cluster_distance) into the problem's labels, then ets_allocate. Returns
  (counts [M], seconds it took). NumPy only, picklable: run_searches hands the steps of many
  searches to worker processes."""
  start = time.perf_counter()
  labels = cluster(np.asarray(embeddings), cfg.cluster_distance)
  counts = ets_allocate(scores, dataclasses.replace(problem, labels=np.asarray(labels)), width,
                        cfg)
  return counts, time.perf_counter() - start


def warm_up() -> str:
  """Solves a small random step (24 candidates, so not by enumeration) with the backend
  `solve` picks, so that its imports and setup are done; returns solver_name()."""
  problem = _random_problem(24, (3, 6), 0)
  select_step(np.linspace(0.1, 0.9, 24), np.eye(24) + 0.1, problem, 24, ETSConfig())
  return solver_name()


def _random_problem(m: int, levels: Sequence[int], seed: int,
                    clusters: int = 40) -> SelectionProblem:
  """A random tree: levels[d] ancestor nodes at depth d + 1 (non-decreasing sizes), each under a
  random node of the level above and every node with a child, then m >= levels[-1] candidates
  under the last level; random shares, labels and token counts."""
  rng = np.random.default_rng(seed)
  parents, above = [], [-1]
  for size in levels:
    under = above + rng.choice(above, size - len(above)).tolist()
    above = list(range(len(parents), len(parents) + size))
    parents += [int(p) for p in rng.permutation(under)]
  under = above + rng.choice(above, m - len(above)).tolist()
  leaf_parents = [int(p) for p in rng.permutation(under)]
  n = len(parents)
  return SelectionProblem.from_parents(
      parents, leaf_parents, rng.integers(0, clusters, m), shares=rng.dirichlet(np.ones(m)),
      leaf_tokens=rng.integers(5, 200, m), node_tokens=rng.integers(5, 200, n))


if __name__ == "__main__":
  for node_cost in NODE_COSTS:
    for seed in range(3):
      prob = _random_problem(256, (30, 60, 90, 120, 140, 160), seed)
      sel = solve(prob, ETSConfig(node_cost=node_cost), width=256)
      print(f"{node_cost} seed={seed}: M=256 N=600 kept {len(sel.kept)} candidates, "
            f"{len(sel.ancestors)} nodes, {len(sel.clusters)} clusters, {sel.seconds:.3f} s")
