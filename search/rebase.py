"""REBASE's reward-balanced expansion: split a width of children over candidates by a softmax of
their process-reward scores (Wu et al., "Inference Scaling Laws", arXiv 2408.00724, Sec. 3.2).

The rule, exactly (candidates visited largest softmax weight first, ties by index):

  w = softmax(scores / T)
  renormalize=True (default; REBASE's and ETS's released code, `select_softmax`):
    count_i = min(R, ceil(R * w_i / S_i)), R = width not yet given out, S_i = the weight of the
    candidates not yet visited, i included. The last candidate with weight > 0 gets R * w / w = R,
    so the counts sum to width; once R is 0 the rest get 0 (pruned).
  renormalize=False:
    count_i = min(R, ceil(width * w_i)): the same order, each ceil of the full width's share
    until the width is used up (the sum of the ceils is >= width, so it is always used up).

The ceil ignores float noise above an integer >= 1 (EPS). Both give counts that sum to width,
non-increasing in the visiting order (so a higher score never gets fewer children). They differ
when rounding up the leaders leaves little for the tail: weights (.41, .41, .18) at width 10
give (5, 4, 1) renormalized and (5, 5, 0) not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A share within EPS above an integer >= 1 (3 * (1/3) in floats) counts as that integer; any
# share in (0, 1] still rounds up to 1, as in REBASE's exact ceil.
EPS = 1e-9


def softmax_weights(scores: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
  """softmax(scores / temperature) in float64 ([M] -> [M]), max-subtracted."""
  s = np.asarray(scores, np.float64) / temperature
  e = np.exp(s - s.max())
  return e / e.sum()


def _ceil(x: float) -> int:
  return math.ceil(x - EPS) if x > 1 else math.ceil(x)


def _check(scores: Sequence[float] | np.ndarray, width: int, temperature: float) -> np.ndarray:
  s = np.asarray(scores, np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f"scores must be a non-empty 1-D sequence, got shape {s.shape}")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"scores must be finite, got {s.tolist()}")
  if isinstance(width, bool) or int(width) != width or width < 1:
    raise ValueError(f"width must be an integer >= 1, got {width!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  return s


def allocate(scores: Sequence[float] | np.ndarray, width: int, temperature: float = 0.2, *,
             renormalize: bool = True) -> list[int]:
  """Children per candidate under REBASE's softmax allocation (module docstring for the rule).

  Args:
    scores: [M] float process-reward scores of the candidates, finite.
    width: children to hand out this step (the remaining width), >= 1.
    temperature: softmax temperature T > 0 (REBASE / ETS use 0.2).
    renormalize: share the width left over the weight left (REBASE's code) rather than ceil of
      the full width's share.
  Returns:
    [M] int counts in the candidates' order, summing to width; 0 means pruned.
  """
  s = _check(scores, width, temperature)
  w = softmax_weights(s, temperature)
  order = np.argsort(-w, kind="stable")
  # Weight of the candidates not yet visited, as suffix sums: the last positive one is exactly w.
  left = np.cumsum(w[order][::-1])[::-1]
  counts, rest = [0] * len(s), int(width)
  for i, mass in zip(order, left):
    if rest == 0:
      break
    share = rest * w[i] / mass if renormalize else width * w[i]
    counts[i] = min(rest, _ceil(share))
    rest -= counts[i]
  return counts
