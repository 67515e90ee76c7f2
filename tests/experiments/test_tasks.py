"""Passkey task: exact lengths and needle placement, answer weights, the exact scorer, the grid
evaluator and its plot."""

import numpy as np
import pytest

from experiments.tasks import (
    PasskeyTask,
    evaluate_grid,
    plot_grid,
    score,
    teacher_forced_correct,
)


def char_encode(text: str) -> list[int]:
  return [ord(c) % 251 + 3 for c in text]


def find(hay: np.ndarray, needle) -> int:
  needle = list(needle)
  for i in range(len(hay) - len(needle) + 1):
    if hay[i:i + len(needle)].tolist() == needle:
      return i
  return -1


@pytest.mark.parametrize("flavour", ["synthetic", "synthetic_stream", "text"])
@pytest.mark.parametrize("length", [90, 97, 300])
def test_examples_have_exact_length_needle_at_depth_and_answer(flavour, length):
  stream = np.arange(5000) % 200
  task = {"synthetic": lambda: PasskeyTask.synthetic(300),
          "synthetic_stream": lambda: PasskeyTask.synthetic(300, value_digits=3, filler=stream),
          "text": lambda: PasskeyTask.from_tokenizer(char_encode, stream)}[flavour]()
  rng = np.random.default_rng(0)
  for depth in (0.0, 0.3, 1.0):
    ex = task.sample(rng, length, depth)
    assert ex.tokens.shape == (length,) and ex.tokens.dtype == np.int32
    value = task._value_tokens(ex.value)
    assert ex.answer.tolist() == value and ex.answer_len == len(value)
    assert len(ex.value) == task.value_digits and ex.value.isdigit()
    needle = [*task.needle_prefix, *value, *task.needle_suffix]
    at = find(ex.tokens, needle)
    n_fill = length - len(needle) - len(task.query) - len(value)
    assert at == round(depth * n_fill)
    q = length - len(value) - len(task.query)
    assert ex.tokens[q:q + len(task.query)].tolist() == list(task.query)
  if flavour == "synthetic":  # filler never uses the reserved ids
    ex = task.sample(rng, length)
    fill = np.delete(ex.tokens, np.s_[-ex.answer_len - 1:])
    assert (np.sort(np.unique(fill))[:-(task.value_digits + 2)] < 287).all()


def test_too_short_and_bad_depth_raise():
  task = PasskeyTask.synthetic(100)
  with pytest.raises(ValueError, match="minimum"):
    task.sample(np.random.default_rng(0), task.min_length() - 1)
  task.sample(np.random.default_rng(0), task.min_length())
  with pytest.raises(ValueError, match="depth"):
    task.sample(np.random.default_rng(0), 50, 1.5)
  with pytest.raises(ValueError, match="depth_range"):
    task.sample(np.random.default_rng(0), 50, depth_range=(0.6, 0.4))


def test_random_depths_are_uniform_on_the_range():
  seed = 3
  print(f"seed {seed}")
  task = PasskeyTask.synthetic(300)
  rng = np.random.default_rng(seed)
  depths = np.array([task.sample(rng, 64, depth_range=(0.02, 0.98)).depth for _ in range(400)])
  assert depths.min() >= 0.02 and depths.max() <= 0.98
  assert depths.min() < 0.1 and depths.max() > 0.9  # spread over the range, not stuck at an end
  assert abs(depths.mean() - 0.5) < 0.05


def test_batch_weights_mark_the_answer_targets():
  task = PasskeyTask.from_tokenizer(lambda s: [ord(c) for c in s] if s[1:].isdigit() and
                                    s[1] == "1" else char_encode(s), np.arange(3000) % 100,
                                    value_digits=2)
  tokens, weights = task.batch(np.random.default_rng(1), 6, 96)
  assert tokens.shape == (6, 96) and weights.shape == (6, 95)
  for w in weights:
    n = int(w.sum())
    assert w[-n:].all() and not w[:-n].any()
    assert n == 3  # " " + 2 digits under this encoder


def test_scorer_is_exact():
  task = PasskeyTask.synthetic(500)
  rng = np.random.default_rng(2)
  exs = [task.sample(rng, 50) for _ in range(4)]
  assert all(score(e.answer.tolist() + [7, 7], e) for e in exs)
  assert not score(exs[0].answer.tolist()[:-1], exs[0])
  wrong = exs[0].answer.copy()
  wrong[-1] += 1
  assert not score(wrong, exs[0])
  # Teacher forcing: predictions at t are the tokens at t + 1 (an oracle), then one corrupted.
  oracle = np.stack([np.roll(e.tokens, -1) for e in exs])
  assert teacher_forced_correct(oracle, exs).all()
  oracle[1, 50 - 2] += 1  # the last answer token's prediction
  assert teacher_forced_correct(oracle, exs).tolist() == [True, False, True, True]
  logits = np.eye(501)[oracle]  # [B, L, V] one-hot
  assert teacher_forced_correct(logits, exs).tolist() == [True, False, True, True]


def test_grid_evaluator_and_plot(tmp_path):
  task = PasskeyTask.synthetic(200)

  def oracle_unless_deep(exs):  # right unless the needle is in the second half
    return np.array([e.depth < 0.5 for e in exs])

  grid = evaluate_grid(oracle_unless_deep, task, lengths=[32, 64, 128], depths=[0.0, 0.25, 1.0],
                       samples=3)
  assert grid["accuracy"] == [[1.0] * 3, [1.0] * 3, [0.0] * 3]
  assert grid["mean"] == pytest.approx(2 / 3)
  seen = []
  evaluate_grid(lambda exs: seen.append([e.tokens for e in exs]) or np.ones(len(exs)), task,
                [32], [0.5], samples=2, seed=5)
  evaluate_grid(lambda exs: seen.append([e.tokens for e in exs]) or np.ones(len(exs)), task,
                [32], [0.5], samples=2, seed=5)
  np.testing.assert_array_equal(seen[0], seen[1])
  path = plot_grid({"dense": grid, "s2": grid}, tmp_path / "grid.png")
  assert path.stat().st_size > 1000
