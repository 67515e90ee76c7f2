"""REBASE's allocation: exact width, monotone in score, hand-computed cases for both rounding
rules, temperature scaling, and bad inputs."""

import math

import numpy as np
import pytest

from search.rebase import allocate, softmax_weights


@pytest.mark.parametrize("renormalize", [True, False])
def test_allocate_uses_the_whole_width_and_is_monotone_in_score(renormalize):
  seed = 11
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  for _ in range(300):
    m, width = int(rng.integers(1, 60)), int(rng.integers(1, 300))
    scores = rng.standard_normal(m) * rng.choice([0.01, 0.2, 1.0, 5.0])
    if rng.random() < 0.3:  # ties
      scores = np.round(scores, 1)
    counts = allocate(scores, width, float(rng.choice([0.05, 0.2, 1.0])), renormalize=renormalize)
    assert len(counts) == m and sum(counts) == width and min(counts) >= 0
    for i in range(m):
      for j in range(m):
        if scores[i] > scores[j] or (scores[i] == scores[j] and i < j):
          assert counts[i] >= counts[j], (scores.tolist(), width, counts)


W3 = (0.2 * np.log([0.41, 0.41, 0.18])).tolist()  # softmax at T = 0.2 gives (.41, .41, .18)


@pytest.mark.parametrize("scores, width, renormalize, expected", [
    ([0, 0, 0, 0], 16, True, [4, 4, 4, 4]),
    ([0, 0, 0], 3, True, [1, 1, 1]),  # 3 * (1/3) is not rounded up to 2
    ([0, 0, 0], 3, False, [1, 1, 1]),
    ([0, 0, 0], 4, True, [2, 1, 1]),  # ceil(4/3) = 2, then ceil(2 * (1/3) / (2/3)) = 1, 1
    ([0, 0, 0], 4, False, [2, 2, 0]),  # ceil(4/3) twice uses the width up
    (W3, 10, True, [5, 4, 1]),  # 5, ceil(5 * .41 / .59) = 4, 1
    (W3, 10, False, [5, 5, 0]),
    ([1, 0], 16, True, [16, 0]),  # w = (.9933, .0067): ceil(15.9) = 16
    ([0, 1], 16, False, [0, 16]),
    ([1, 0], 256, True, [255, 1]),  # ceil(254.3) = 255, the rest 1
    ([1, 0], 256, False, [255, 1]),
    ([5.0], 7, True, [7]),
])
def test_allocate_hand_cases(scores, width, renormalize, expected):
  assert allocate(scores, width, 0.2, renormalize=renormalize) == expected


def test_allocate_depends_on_scores_over_temperature_only():
  seed = 5
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  s = rng.standard_normal(20)
  assert allocate(s, 64, 0.2) == allocate(3 * s, 64, 0.6)
  w = softmax_weights(s, 0.2)
  assert math.isclose(w.sum(), 1.0) and np.argmax(w) == np.argmax(s)


@pytest.mark.parametrize("scores, width, temperature, match", [
    ([0.1, 0.2], 0, 0.2, "width must be an integer >= 1"),
    ([0.1, 0.2], -3, 0.2, "width must be an integer >= 1"),
    ([0.1, 0.2], 2.5, 0.2, "width must be an integer >= 1"),
    ([0.1, 0.2], 4, 0.0, "temperature must be > 0"),
    ([0.1, 0.2], 4, -1.0, "temperature must be > 0"),
    ([], 4, 0.2, "non-empty 1-D"),
    ([[0.1, 0.2]], 4, 0.2, "non-empty 1-D"),
    ([0.1, float("nan")], 4, 0.2, "must be finite"),
])
def test_allocate_rejects_bad_inputs(scores, width, temperature, match):
  with pytest.raises(ValueError, match=match):
    allocate(scores, width, temperature)
