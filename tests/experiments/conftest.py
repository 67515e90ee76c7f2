"""Fixtures the experiments tests share: a small generated corpus."""

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
  """A small text folder: a few 'files' of generated Python-like text."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "value", "for", "in", "range", "if", "else", "print", "x",
           "y", "data", "items", "class", "import", "None", "True", "(", ")", ":", "=", "+"]
  for i in range(12):
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 10))) for _ in range(300)]
    (root / f"f{i:02d}.py").write_text("\n".join(lines))
  return root
