"""ETS's step program: HiGHS's optimum (through cvxpy and through SciPy) against exhaustive search
and a loop objective on random trees (uniform and token costs), the constraints in what it
returns, the lambdas' effect, ets_allocate on hand cases, the fallbacks without cvxpy, bad
inputs, and the clustering against scipy."""

import dataclasses
import itertools
import sys

import numpy as np
import pytest

from search.cluster import cluster
from search.ets import (
    ETSConfig,
    SelectionProblem,
    _random_problem,
    ets_allocate,
    solve,
    solve_brute,
    solve_scipy,
)
from search.rebase import allocate


def _tree(seed: int, node_cost: str):
  """A random tree of 0..8 ancestor nodes (each under the root or an earlier node: random depths
  and branching, shared ancestors), 1..12 candidates under the nodes or the root, random labels,
  shares (Dirichlet or REBASE's count shares, zeros included) and token counts; random lambdas."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(0, 9))
  parents = [int(rng.integers(-1, j)) for j in range(n)]
  bare = [j for j in range(n) if j not in set(parents)]
  m = int(rng.integers(max(1, len(bare)), 13))
  leaf_parents = rng.permutation(bare + rng.integers(-1, n, m - len(bare)).tolist()).tolist()
  labels = 7 * rng.integers(0, int(rng.integers(1, m + 1)), m) - 3
  width = int(rng.choice([16, 64, 256]))
  if seed % 2:
    shares = rng.dirichlet(np.ones(m))
  else:
    shares = np.asarray(allocate(rng.standard_normal(m), width), float) / width
  prob = SelectionProblem.from_parents(parents, leaf_parents, labels, shares=shares,
                                       leaf_tokens=rng.integers(1, 300, m),
                                       node_tokens=rng.integers(1, 300, n))
  lambda_s = None if seed % 3 == 0 else float(rng.uniform(0, 3))
  return prob, ETSConfig(lambda_b=float(rng.uniform(0, 4)), lambda_s=lambda_s,
                         node_cost=node_cost), width


def _objective(prob: SelectionProblem, cfg: ETSConfig, kept, width: int) -> float:
  """The program's objective at keep set `kept`, written out from its definition with loops."""
  m, n = prob.num_candidates, prob.num_nodes
  nodes = set().union(*(prob.paths[i] for i in kept))
  if cfg.node_cost == "tokens":
    mean = (sum(prob.leaf_tokens) + sum(prob.node_tokens)) / (m + n)
    cost = (sum(prob.node_tokens[j] for j in nodes) + sum(prob.leaf_tokens[i] for i in kept)) / mean
  else:
    cost = len(nodes) + len(kept)
  k = len(set(prob.labels.tolist()))
  covered = len({int(prob.labels[i]) for i in kept})
  return (sum(prob.shares[i] for i in kept) - cfg.lambda_b / (m + n) * cost
          + cfg.lambda_s_at(width) / k * covered)


def _check(prob: SelectionProblem, sel, cfg: ETSConfig, width: int):
  """The constraints hold in sel, and its objective is the loop objective of its keep set."""
  kept, nodes = set(sel.kept), set(sel.ancestors)
  assert kept, "sum_i x_i >= 1"
  for i in kept:
    assert set(prob.paths[i]) <= nodes, f"candidate {i}'s ancestors are kept"
  for j in nodes:
    assert any(j in prob.paths[i] for i in kept), f"node {j} has a kept leaf"
  labels = sorted(set(prob.labels.tolist()))
  assert {labels[k] for k in sel.clusters} == {int(prob.labels[i]) for i in kept}
  assert sel.objective == pytest.approx(_objective(prob, cfg, sel.kept, width), abs=1e-9)
  assert sel.seconds >= 0


@pytest.mark.parametrize("node_cost", ["uniform", "tokens"])
@pytest.mark.parametrize("seed", range(32))
def test_highs_optimum_equals_exhaustive_search(seed, node_cost):
  print(f"seed={seed} node_cost={node_cost}")
  prob, cfg, width = _tree(seed, node_cost)
  ilp, brute = solve(prob, cfg, width), solve_brute(prob, cfg, width)
  via_scipy = solve_scipy(prob, cfg, width)
  for sel in (ilp, brute, via_scipy):
    _check(prob, sel, cfg, width)
  assert ilp.objective == pytest.approx(brute.objective, abs=1e-7)
  assert via_scipy.objective == pytest.approx(brute.objective, abs=1e-7)
  if prob.num_candidates <= 8:  # and solve_brute against the loop objective over all subsets
    best = max(_objective(prob, cfg, s, width) for r in range(1, prob.num_candidates + 1)
               for s in itertools.combinations(range(prob.num_candidates), r))
    assert brute.objective == pytest.approx(best, abs=1e-9)


def test_a_width_256_like_problem_solves_to_a_valid_selection():
  seed = 3
  print(f"seed={seed}")
  prob = _random_problem(256, (30, 60, 90, 120, 140, 160), seed)
  cfg = ETSConfig()
  sel = solve(prob, cfg, 256)
  print(f"M=256 N={prob.num_nodes}: kept {len(sel.kept)}, {sel.seconds:.3f} s")
  _check(prob, sel, cfg, 256)
  best_one = max(_objective(prob, cfg, (i,), 256) for i in range(256))
  assert sel.objective >= max(best_one, _objective(prob, cfg, range(256), 256)) - 1e-9


def _mid(seed: int) -> SelectionProblem:
  return _random_problem(40, (4, 9, 20), seed, clusters=12)


@pytest.mark.parametrize("seed", range(4))
def test_a_larger_lambda_b_keeps_fewer_nodes(seed):
  print(f"seed={seed}")
  prob = _mid(seed)
  sizes = []
  for lambda_b in (0.0, 0.3, 1.0, 2.0, 4.0, 8.0, 1e3):
    sel = solve(prob, ETSConfig(lambda_b=lambda_b, lambda_s=0.5))
    sizes.append(len(sel.kept) + len(sel.ancestors))
  assert sizes == sorted(sizes, reverse=True), sizes
  assert sizes[0] == 40 + prob.num_nodes  # free nodes: every candidate (shares > 0) is kept
  assert sizes[-1] == 1 + min(len(p) for p in prob.paths)  # one candidate on a shortest path


@pytest.mark.parametrize("seed", range(4))
def test_a_larger_lambda_s_covers_more_clusters(seed):
  print(f"seed={seed}")
  prob = _mid(seed)
  covered = [len(solve(prob, ETSConfig(lambda_b=2.0, lambda_s=s)).clusters)
             for s in (0.0, 0.5, 1.0, 2.0, 4.0, 1e3)]
  assert covered == sorted(covered), covered
  assert covered[-1] == len(set(prob.labels.tolist())) > covered[0]


def test_lambda_s_defaults_to_the_preset_of_the_nearest_width():
  cfg = ETSConfig()
  got = {w: cfg.lambda_s_at(w) for w in (1, 16, 32, 40, 64, 100, 128, 256, 4096)}
  assert got == {1: 1.5, 16: 1.5, 32: 1.5, 40: 1.4, 64: 1.4, 100: 1.4, 128: 1.4, 256: 1.45,
                 4096: 1.45}
  assert ETSConfig(lambda_s=0.7).lambda_s_at(256) == 0.7


def test_ets_allocate_hand_case_keeps_a_new_cluster():
  # Four children of the root; softmax(s / .2) = (.418, .326, .254, .003): REBASE gives
  # (2, 2, 0, 0), so O = (.5, .5, 0, 0). Each candidate costs 1/4; each of the K = 2 clusters
  # is worth 1.5 / 2: keep 0 and 1 (+.25 each, cluster 0) and 3 (-.25 + .75), not 2 (-.25).
  scores, prob = [1.0, 0.95, 0.9, 0.0], SelectionProblem(((),) * 4, [0, 0, 0, 1])
  cfg = ETSConfig(lambda_b=1.0, lambda_s=1.5)
  sel = solve(dataclasses.replace(prob, shares=np.array([0.5, 0.5, 0, 0])), cfg, 4)
  assert sel.kept == (0, 1, 3) and sel.objective == pytest.approx(0.25 + 0.25 - 0.25 + 1.5)
  # REBASE over (1, .95, 0): (.56, .44, .004) -> 3, then ceil(1 * .44 / .44) = 1, then nothing.
  assert ets_allocate(scores, prob, 4, cfg) == [3, 1, 0, 0]


def test_ets_allocate_free_nodes_is_rebase_and_costly_nodes_keep_the_best():
  scores = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.0])  # REBASE at 12: (0, 2, 0, 10, 0, 0)
  prob = SelectionProblem(((),) * 6, [0, 1, 2, 0, 1, 2])
  even = ets_allocate(np.zeros(6), prob, 12, ETSConfig(lambda_b=0.0, lambda_s=0.0))
  assert even == [2] * 6  # every share > 0 is kept, then REBASE over all of them
  best = ets_allocate(scores, prob, 12, ETSConfig(lambda_b=1e3, lambda_s=0.0))
  assert best == [12 if i == np.argmax(scores) else 0 for i in range(6)]


@pytest.mark.parametrize("seed", range(6))
def test_ets_allocate_spends_the_width_on_kept_candidates_only(seed):
  print(f"seed={seed}")
  prob = _mid(seed)
  scores = np.random.default_rng(seed).uniform(0, 1, 40)
  for node_cost in ("uniform", "tokens"):
    cfg = ETSConfig(node_cost=node_cost)
    counts = ets_allocate(scores, prob, 64, cfg)
    share = np.asarray(allocate(scores, 64), float) / 64
    kept = solve(dataclasses.replace(prob, shares=share), cfg, 64).kept
    assert sum(counts) == 64 and all(counts[i] == 0 for i in set(range(40)) - set(kept))
    assert [counts[i] for i in kept] == allocate(scores[list(kept)], 64)


def test_without_cvxpy_small_problems_fall_back_and_large_ones_name_the_package(monkeypatch):
  prob, cfg, width = _tree(4, "uniform")
  expected = solve_brute(prob, cfg, width)
  large = _mid(0)
  with_cvxpy = solve(large, ETSConfig())
  monkeypatch.setitem(sys.modules, "cvxpy", None)  # `import cvxpy` raises ImportError
  assert solve(prob, cfg, width).kept == expected.kept
  # M > 16: the same HiGHS program through scipy.optimize.milp
  assert solve(large, ETSConfig()).objective == pytest.approx(with_cvxpy.objective, abs=1e-7)
  monkeypatch.setitem(sys.modules, "scipy.optimize", None)
  with pytest.raises(ImportError, match="pip install cvxpy highspy"):
    solve(large, ETSConfig())


def _bad_problem(**kw):
  fields = dict(paths=((0,), (0, 1)), labels=[0, 1], shares=[0.5, 0.5])
  return SelectionProblem(**{**fields, **kw})


@pytest.mark.parametrize("make, match", [
    (lambda: ETSConfig(lambda_b=-0.1), "lambda_b must be >= 0"),
    (lambda: ETSConfig(lambda_s=-1.0), "lambda_s must be >= 0"),
    (lambda: ETSConfig(temperature=0.0), "temperature must be > 0"),
    (lambda: ETSConfig(cluster_distance=-0.1), "cluster_distance must be >= 0"),
    (lambda: ETSConfig(node_cost="flops"), "node_cost must be one of"),
    (lambda: ETSConfig().lambda_s_at(0), "width must be >= 1"),
    (lambda: _bad_problem(paths=()), "at least one candidate"),
    (lambda: _bad_problem(labels=[0]), "labels must be 1-D of length 2"),
    (lambda: _bad_problem(shares=[0.5, float("inf")]), "shares must be finite"),
    (lambda: _bad_problem(paths=((0,), (0, 2))), "every node 0..2 must be"),
    (lambda: _bad_problem(paths=((0, 1), (1, 0))), "disagree on node 1's parent"),
    (lambda: _bad_problem(num_nodes=1), r"ancestor ids must lie in \[0, 1\)"),
    (lambda: _bad_problem(node_tokens=[3]), r"ancestor ids must lie in \[0, 1\)"),
    (lambda: _bad_problem(leaf_tokens=[3, -1]), "leaf_tokens must be finite and >= 0"),
    (lambda: SelectionProblem.from_parents([1, 0], [1], [0]), "acyclic"),
    (lambda: solve(_bad_problem(), ETSConfig(node_cost="tokens")), "needs leaf_tokens"),
    (lambda: solve(_bad_problem(shares=None), ETSConfig()), "problem.shares is None"),
    (lambda: solve_brute(SelectionProblem(((),) * 17, [0] * 17, shares=np.ones(17)),
                         ETSConfig()), "M = 17 > 16"),
    (lambda: ets_allocate([0.1, 0.2], _bad_problem(), 0), "width must be an integer >= 1"),
    (lambda: ets_allocate([0.1], _bad_problem(), 4), r"scores must be \[2\]"),
])
def test_bad_inputs_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# --- clustering -----------------------------------------------------------------------------

def _first_appearance(labels) -> list[int]:
  seen = {}
  return [seen.setdefault(int(x), len(seen)) for x in labels]


@pytest.mark.parametrize("seed", range(12))
def test_cluster_matches_scipy_average_linkage(seed):
  hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  n = int(rng.choice([2, 7, 40, 130]))
  centers = rng.standard_normal((int(rng.integers(1, 12)), 16))
  noise = float(rng.choice([0.05, 0.15, 0.3, 1.0]))
  e = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, 16))
  z = hierarchy.linkage(e, method="average", metric="cosine")
  for distance in (0.0, 0.01, 0.05, 0.2, 0.6, 1.1):
    ref = _first_appearance(hierarchy.fcluster(z, distance, criterion="distance"))
    assert cluster(e, distance, impl="numpy") == ref, (n, noise, distance)
    assert cluster(e, distance, impl="scipy") == ref, (n, noise, distance)


@pytest.mark.parametrize("impl", ["numpy", "auto"])
def test_cluster_hand_cases(impl):
  assert cluster(impl=impl, embeddings=np.array([[1.0, 0.0]])) == [0]
  # rows 0 and 2 are 5e-5 apart, row 1 is orthogonal; labels by first appearance
  e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.0, 2.0]])
  assert cluster(impl=impl, embeddings=e) == [0, 1, 0, 1]
  # average, not single, linkage: 0-1 are .03 apart, 1-2 .04, but {0, 1} averages .088 to 2
  t1, t2 = np.arccos(0.97), np.arccos(0.96)
  a = [np.array([np.cos(t), np.sin(t)]) for t in (0.0, t1, t1 + t2)]
  assert cluster(impl=impl, embeddings=np.stack(a), distance=0.05) == [0, 0, 1]


@pytest.mark.parametrize("e, distance, match", [
    (np.zeros((0, 3)), 0.05, r"\[n, d\] with n >= 1"),
    (np.ones(3), 0.05, r"\[n, d\] with n >= 1"),
    (np.array([[1.0, 0.0], [0.0, 0.0]]), 0.05, r"zero embeddings \(rows \[1\]\)"),
    (np.array([[1.0, np.nan]]), 0.05, "must be finite"),
    (np.ones((2, 2)), -0.1, "distance must be >= 0"),
    (np.ones((2, 2)), 0.05, "unknown clustering impl 'fast'"),
])
def test_cluster_rejects_bad_inputs(e, distance, match):
  impl = "fast" if "impl" in match else "auto"
  with pytest.raises(ValueError, match=match):
    cluster(e, distance, impl)


@pytest.mark.parametrize("m,levels,seed", [(64, (8, 16, 32, 48), 0), (64, (8, 16, 32, 48), 1),
                                           (256, (30, 60, 90, 120, 140, 160), 2)])
def test_scipy_lp_first_equals_the_cvxpy_milp(m, levels, seed):
  """solve_scipy solves the LP relaxation first and keeps it only when integral (seed 1 at
  M = 64 is fractional: the MILP runs); both paths reach cvxpy's MILP optimum."""
  print(f"seed={seed}")
  prob = _random_problem(m, levels, seed)
  for node_cost in ("uniform", "tokens"):
    cfg = ETSConfig(node_cost=node_cost)
    a, b = solve_scipy(prob, cfg, m), solve(prob, cfg, m)
    _check(prob, a, cfg, m)
    assert a.objective == pytest.approx(b.objective, abs=1e-7)
