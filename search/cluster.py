"""Average-linkage agglomerative clustering of step embeddings under cosine distance, cut at a
distance threshold: the clusters ETS's coverage term counts (ETS, arXiv 2502.13575, Sec. 4.2;
scipy's `linkage(method="average", metric="cosine")` + `fcluster(t, criterion="distance")`)."""

from __future__ import annotations

import numpy as np


def cosine_distances(embeddings: np.ndarray) -> np.ndarray:
  """1 - cos(u, v) of every pair of rows, float64 [n, d] -> [n, n], clipped to [0, 2]."""
  e = np.asarray(embeddings, np.float64)
  u = e / np.linalg.norm(e, axis=1, keepdims=True)
  return np.clip(1.0 - u @ u.T, 0.0, 2.0)


IMPLS = ("auto", "scipy", "numpy")


def cluster(embeddings: np.ndarray, distance: float = 0.05, impl: str = "auto") -> list[int]:
  """Flat clusters of average linkage under cosine distance.

  impl "scipy": scipy.cluster.hierarchy (compiled, about 3 ms at n = 256 where the loop below
  takes 13); "numpy": the loop below (the reference the tests hold scipy to); "auto": scipy
  where it is installed.

  The numpy loop greedily merges the two clusters of least average pairwise distance while that
  distance is <= `distance` (average linkage never decreases along the merges, so this is the
  dendrogram cut scipy's fcluster(criterion="distance") makes). Average distances are updated by the
  Lance-Williams rule d(k, i+j) = (n_i d(k, i) + n_j d(k, j)) / (n_i + n_j): O(n^2) per merge,
  O(n^3) in all, vectorised (n = 256 takes milliseconds).

  Args:
    embeddings: [n, d] float step embeddings, n >= 1, no zero rows.
    distance: the cut, >= 0 (ETS: 0.05).
  Returns:
    [n] int labels 0..K-1, numbered in order of first appearance.
  """
  e = np.asarray(embeddings, np.float64)
  if e.ndim != 2 or e.shape[0] == 0:
    raise ValueError(f"embeddings must be [n, d] with n >= 1, got shape {e.shape}")
  if not np.all(np.isfinite(e)):
    raise ValueError("embeddings must be finite")
  zero = np.flatnonzero(np.linalg.norm(e, axis=1) == 0)
  if zero.size:
    raise ValueError(f"cosine distance is undefined for zero embeddings (rows {zero.tolist()})")
  if not distance >= 0:
    raise ValueError(f"distance must be >= 0, got {distance!r}")
  if impl not in IMPLS:
    raise ValueError(f"unknown clustering impl {impl!r}; known: {', '.join(IMPLS)}")
  if impl != "numpy" and e.shape[0] > 1:
    try:
      from scipy.cluster import hierarchy
    except ImportError:
      if impl == "scipy":
        raise
    else:
      z = hierarchy.linkage(e, method="average", metric="cosine")
      return _first_appearance(hierarchy.fcluster(z, distance, criterion="distance"))
  n = e.shape[0]
  d = cosine_distances(e)
  np.fill_diagonal(d, np.inf)
  size = np.ones(n)
  root = np.arange(n)  # root[p] = the cluster (its lowest-index member's row) point p is in
  for _ in range(n - 1):
    flat = int(np.argmin(d))
    i, j = divmod(flat, n)
    if not d[i, j] <= distance:
      break
    i, j = min(i, j), max(i, j)
    merged = (size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])
    d[i], d[:, i] = merged, merged
    d[j], d[:, j] = np.inf, np.inf
    d[i, i] = np.inf
    size[i] += size[j]
    root[root == j] = i
  return _first_appearance(root)


def _first_appearance(labels) -> list[int]:
  """Labels renumbered 0..K-1 in order of first appearance."""
  _, first, inverse = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
  rank = np.empty(first.size, np.int64)
  rank[np.argsort(first)] = np.arange(first.size)
  return rank[np.ravel(inverse)].tolist()
