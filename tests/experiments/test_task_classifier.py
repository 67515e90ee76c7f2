"""The task classifier of WindowKV's switch: trained on the suite's training split, it names the
task type of held-out examples; the oracle follows the families."""

import pytest

from experiments import longctx
from experiments.task_classifier import TaskClassifier, oracle


def test_classifier_learns_the_task_types_of_held_out_examples():
  seed = 81
  print(f"seed={seed}")
  train = longctx.train_examples(42, [1024], seed=seed)
  clf = TaskClassifier.train(train, steps=200)
  held_out = longctx.suite([1024], 3, seed=seed)
  assert clf.accuracy(held_out) >= 0.95
  assert {oracle(e) for e in held_out} == {"localization", "aggregation"}
  untrained = TaskClassifier.train(train, steps=0)
  assert untrained.accuracy(held_out) < 0.95  # all one class: the training is what separates


def test_oracle_and_empty_training_errors():
  ex = longctx.suite([1024], 1, seed=1, families=["needle", "common_words"])
  assert [oracle(e) for e in ex] == ["localization", "aggregation"]
  with pytest.raises(ValueError, match="at least one example"):
    TaskClassifier.train([])
