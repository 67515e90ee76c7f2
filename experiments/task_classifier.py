"""WindowKV's task switch: a small classifier trained here that names a prompt's task type.

WindowKV picks its window score by task type (localization -> 'max', aggregation -> 'average';
kvcache.windowkv.WindowKV.for_task). Its paper classifies the question with a fine-tuned BERT
that is not released; here a logistic regression over hashed word unigrams and bigrams of the
question (and, optionally, the start of the context), trained on the long-context suite's
training split (experiments.longctx.train_examples), in NumPy. `oracle` gives the true type
from the family, for the ablation.

    clf = TaskClassifier.train(longctx.train_examples(256, [1024], seed=0))
    press = WindowKV.for_task(clf.predict(example), budget=0.12)

The suite's questions come from a few templates per family, so the classifier mostly learns
them; it is the plumbing of the switch, not a claim about free-form questions.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence

import numpy as np

from experiments.longctx import AGGREGATION, LOCALIZATION, Example

TASK_TYPES = ("localization", "aggregation")


def oracle(example: Example) -> str:
  """The true task type of an example's family."""
  if example.family in LOCALIZATION:
    return "localization"
  if example.family in AGGREGATION:
    return "aggregation"
  raise ValueError(f"family {example.family!r} has no task type")


def featurize(text: str, dim: int) -> np.ndarray:
  """float32 [dim]: L2-normalised counts of hashed (crc32) lower-case word unigrams and bigrams."""
  words = re.findall(r"[a-z0-9_]+", text.lower())
  x = np.zeros(dim, np.float32)
  for gram in words + [a + " " + b for a, b in zip(words, words[1:])]:
    x[zlib.crc32(gram.encode()) % dim] += 1.0
  n = np.linalg.norm(x)
  return x / n if n else x


@dataclasses.dataclass
class TaskClassifier:
  """Logistic regression: P(aggregation | text) = sigmoid(w . features(text) + b).

  Attributes: w [dim] float32, b, dim, context_chars (how much of the context's start the
  features also read; 0 = the question alone).
  """

  w: np.ndarray
  b: float
  dim: int = 4096
  context_chars: int = 0

  def _text(self, example: Example) -> str:
    return example.question + " " + example.context[:self.context_chars]

  @classmethod
  def train(cls, examples: Sequence[Example], *, dim: int = 4096, context_chars: int = 0,
            steps: int = 300, lr: float = 2.0, l2: float = 1e-4) -> TaskClassifier:
    """Full-batch gradient descent on the logistic loss over the examples' oracle labels."""
    if not examples:
      raise ValueError("train needs at least one example")
    clf = cls(np.zeros(dim, np.float32), 0.0, dim, context_chars)
    x = np.stack([featurize(clf._text(e), dim) for e in examples])
    y = np.asarray([oracle(e) == "aggregation" for e in examples], np.float32)
    w, b = clf.w, 0.0
    for _ in range(steps):
      p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
      g = p - y
      w = w - lr * (x.T @ g / len(y) + l2 * w)
      b -= lr * float(np.mean(g))
    clf.w, clf.b = w.astype(np.float32), b
    return clf

  def prob_aggregation(self, example: Example) -> float:
    z = float(featurize(self._text(example), self.dim) @ self.w + self.b)
    return 1.0 / (1.0 + np.exp(-z))

  def predict(self, example: Example) -> str:
    """'localization' or 'aggregation'."""
    return TASK_TYPES[int(self.prob_aggregation(example) > 0.5)]

  def accuracy(self, examples: Sequence[Example]) -> float:
    return float(np.mean([self.predict(e) == oracle(e) for e in examples]))
