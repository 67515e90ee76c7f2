"""Long-context retrieval tasks with exact scorers: passkey / needle-in-a-haystack.

A key-value "needle" is hidden at a chosen depth inside filler; the sequence ends with a query
and the model must produce the value. Two flavours share one generator:
- synthetic: filler and values are token ids (markers and digit ids reserved at the top of the
  vocabulary), for any model and vocabulary;
- text: the needle is the sentence "The pass key is 48213. Remember it." and the question "What
  is the pass key? The pass key is", both tokenized, with filler cut from a token stream of the
  tokenizer's corpus (experiments.data.Dataset.train / .val).

Every example is exactly `length` tokens: prompt + answer. Training reads the whole sequence
with the loss on the answer tokens only; scoring is exact: every answer token must be the
model's greedy choice (teacher forcing gives the same verdict as greedy decoding, since greedy
decoding succeeds exactly when each answer token is the argmax given the right prefix).

    task = PasskeyTask.synthetic(vocab_size=2048)
    tokens, weights = task.batch(rng, batch_size=8, length=512)    # [B, L], [B, L - 1]
    grid = evaluate_grid(model_scorer(model), task, lengths=[256, 512], depths=[0, .5, 1])
    plot_grid(grid, "results/s2_passkey_cpu.png")
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

DIGITS = "0123456789"


@dataclasses.dataclass(frozen=True)
class Example:
  """One task sequence.

  Attributes:
    tokens: int32 [L], the prompt followed by the answer.
    answer_len: A; the answer is tokens[-A:].
    depth: where the needle starts, as a fraction of the filler (0 = first token, 1 = last).
    value: the hidden value (a digit string).
  """
  tokens: np.ndarray
  answer_len: int
  depth: float
  value: str

  @property
  def prompt(self) -> np.ndarray:
    return self.tokens[: -self.answer_len]

  @property
  def answer(self) -> np.ndarray:
    return self.tokens[-self.answer_len:]


@dataclasses.dataclass(frozen=True, eq=False)
class PasskeyTask:
  """Passkey retrieval: a needle (key marker, value) in filler, a query, the value as answer.

  Attributes:
    needle_prefix: tokens before the value in the needle.
    needle_suffix: tokens after the value in the needle.
    query: tokens after the filler that ask for the value (the answer follows).
    digit_ids: the token id of each digit 0-9 (synthetic flavour), or None for text.
    encode: text -> token ids (text flavour), or None.
    value_digits: digits in a value.
    filler: a token stream filler is cut from, or None for uniform random ids in filler_range.
    filler_range: [low, high) ids of synthetic filler.
  """
  needle_prefix: tuple[int, ...]
  needle_suffix: tuple[int, ...]
  query: tuple[int, ...]
  digit_ids: tuple[int, ...] | None = None
  encode: Callable[[str], list[int]] | None = None
  value_digits: int = 5
  filler: np.ndarray | None = dataclasses.field(default=None, repr=False)
  filler_range: tuple[int, int] = (0, 0)

  @classmethod
  def synthetic(cls, vocab_size: int, value_digits: int = 4, filler: np.ndarray | None = None,
                ) -> PasskeyTask:
    """Markers and the ten digits are the top 13 ids; filler is uniform over the rest (or cut
    from `filler`, a token stream)."""
    if vocab_size < 64:
      raise ValueError(f"vocab_size={vocab_size} is too small for the synthetic task (>= 64)")
    top = vocab_size - 13
    return cls(needle_prefix=(top,), needle_suffix=(top + 1,), query=(top + 2,),
               digit_ids=tuple(range(top + 3, top + 13)), value_digits=value_digits,
               filler=filler, filler_range=(0, top))

  @classmethod
  def from_tokenizer(cls, encode: Callable[[str], list[int]], filler: np.ndarray,
                     value_digits: int = 5) -> PasskeyTask:
    """Text flavour: the needle and question in words, filler from a corpus token stream."""
    return cls(needle_prefix=tuple(encode(" The pass key is")),
               needle_suffix=tuple(encode(". Remember it. ")),
               query=tuple(encode("\nWhat is the pass key? The pass key is")),
               encode=encode, value_digits=value_digits, filler=np.asarray(filler))

  def _value_tokens(self, value: str) -> list[int]:
    if self.digit_ids is not None:
      return [self.digit_ids[int(c)] for c in value]
    return list(self.encode(" " + value))

  def min_length(self) -> int:
    """Shortest sequence (no filler) for the longest value encoding."""
    value = max((self._value_tokens(d * self.value_digits) for d in DIGITS), key=len)
    return len(self.needle_prefix) + 2 * len(value) + len(self.needle_suffix) + len(self.query)

  def _filler(self, rng: np.random.Generator, n: int) -> np.ndarray:
    if self.filler is None:
      return rng.integers(*self.filler_range, size=n, dtype=np.int64)
    if self.filler.shape[0] <= n:
      raise ValueError(f"filler stream of {self.filler.shape[0]} tokens is shorter than {n}")
    start = int(rng.integers(0, self.filler.shape[0] - n))
    return np.asarray(self.filler[start:start + n], np.int64)

  def sample(self, rng: np.random.Generator, length: int, depth: float | None = None,
             depth_range: tuple[float, float] = (0.0, 1.0)) -> Example:
    """One example of exactly `length` tokens with the needle at `depth` (if None, uniform on
    `depth_range`)."""
    value = "".join(rng.choice(list(DIGITS), self.value_digits))
    vt = self._value_tokens(value)
    needle = [*self.needle_prefix, *vt, *self.needle_suffix]
    n_fill = length - len(needle) - len(self.query) - len(vt)
    if n_fill < 0:
      raise ValueError(f"length={length} is shorter than the task's minimum "
                       f"{self.min_length()} tokens")
    if depth is None:
      lo, hi = depth_range
      if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"depth_range must satisfy 0 <= low <= high <= 1, got {depth_range}")
      depth = float(lo + (hi - lo) * rng.random())
    depth = float(depth)
    if not 0.0 <= depth <= 1.0:
      raise ValueError(f"depth must be in [0, 1], got {depth}")
    cut = int(round(depth * n_fill))
    fill = self._filler(rng, n_fill)
    tokens = np.concatenate([fill[:cut], needle, fill[cut:], self.query, vt]).astype(np.int32)
    return Example(tokens, len(vt), depth, value)

  def batch(self, rng: np.random.Generator, batch_size: int, length: int,
            depth: float | None = None, depth_range: tuple[float, float] = (0.0, 1.0),
            ) -> tuple[np.ndarray, np.ndarray]:
    """Training batch: tokens int32 [B, L] and loss weights float32 [B, L - 1] on the targets
    tokens[:, 1:] that are answer tokens (1), zero elsewhere. Answers may differ in length
    (text flavour): each row weighs its own."""
    exs = [self.sample(rng, length, depth, depth_range) for _ in range(batch_size)]
    tokens = np.stack([e.tokens for e in exs])
    weights = np.zeros((batch_size, length - 1), np.float32)
    for i, e in enumerate(exs):
      weights[i, length - 1 - e.answer_len:] = 1.0
    return tokens, weights


def score(predicted: Sequence[int], example: Example) -> bool:
  """Exact match: the first answer_len predicted tokens are the answer."""
  pred = list(predicted)[: example.answer_len]
  return pred == example.answer.tolist()


def teacher_forced_correct(logits: np.ndarray, examples: Sequence[Example]) -> np.ndarray:
  """bool [B]: every answer token is the argmax of the logits before it.

  Args:
    logits: [B, L, V] (or the argmax [B, L]) of the model on the examples' tokens.
  """
  pred = logits if logits.ndim == 2 else np.argmax(logits, -1)
  out = []
  for i, e in enumerate(examples):
    n = e.tokens.shape[0]
    out.append(score(pred[i, n - 1 - e.answer_len:n - 1].tolist(), e))
  return np.array(out, bool)


def model_scorer(model, batch_size: int = 8) -> Callable[[Sequence[Example]], np.ndarray]:
  """A scorer for a colm Decoder: examples (same length) -> bool [B] correct, teacher-forced,
  one jitted forward per chunk of batch_size, argmax on device."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: jax.numpy.argmax(nnx.merge(graphdef, s)(x), -1))

  def run(examples: Sequence[Example]) -> np.ndarray:
    out = []
    for i in range(0, len(examples), batch_size):
      chunk = list(examples[i:i + batch_size])
      toks = np.stack([e.tokens for e in chunk])
      pad = batch_size - len(chunk)  # a fixed batch shape: one compile per length
      if pad:
        toks = np.concatenate([toks, np.repeat(toks[-1:], pad, 0)])
      pred = np.asarray(fwd(state, toks))[: len(chunk)]
      out.append(teacher_forced_correct(pred, chunk))
    return np.concatenate(out)
  return run


def evaluate_grid(scorer: Callable[[Sequence[Example]], np.ndarray], task: PasskeyTask,
                  lengths: Sequence[int], depths: Sequence[float], samples: int = 8,
                  seed: int = 0) -> dict:
  """Accuracy on a depth x length grid.

  Returns:
    {"lengths": [...], "depths": [...], "accuracy": [[acc of depth d at length l] per d],
     "samples": n, "mean": overall accuracy}; examples depend only on (seed, length, depth).
  """
  acc = []
  for di, d in enumerate(depths):
    row = []
    for li, n in enumerate(lengths):
      rng = np.random.default_rng([seed, li, di])
      exs = [task.sample(rng, n, d) for _ in range(samples)]
      row.append(float(np.mean(scorer(exs))))
    acc.append(row)
  return {"lengths": list(map(int, lengths)), "depths": list(map(float, depths)),
          "accuracy": acc, "samples": samples, "mean": float(np.mean(acc))}


def plot_grid(grids: dict[str, dict] | dict, path: str | Path, title: str = "passkey retrieval"
              ) -> Path:
  """Heat map(s) of accuracy, depth (rows) x length (columns); one panel per named grid."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if "accuracy" in grids:
    grids = {"": grids}
  fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids) + 0.8, 3.2), squeeze=False)
  for ax, (name, g) in zip(axes[0], grids.items()):
    a = np.asarray(g["accuracy"])
    im = ax.imshow(a, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(g["lengths"])), [str(x) for x in g["lengths"]], fontsize=7)
    ax.set_yticks(range(len(g["depths"])), [f"{d:.2f}" for d in g["depths"]], fontsize=7)
    for (i, j), v in np.ndenumerate(a):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("context length")
    ax.set_title(name or title, fontsize=9)
  axes[0][0].set_ylabel("needle depth")
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
  fig.suptitle(title, fontsize=10)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def save_grid(grid: dict, path: str | Path) -> None:
  Path(path).write_text(json.dumps(grid, indent=1))
