"""Long-context evaluation suite (RULER-like) with exact scorers, for KV-cache compression.

Seven task families of the two kinds the WindowKV paper evaluates:
- localization (LOCALIZATION): needle, multikey, multivalue, passkey, vartrack: facts hidden at
  chosen depths in filler text, to be found and repeated;
- aggregation (AGGREGATION): common_words, frequent_words: word counts over the whole context.

Filler lines and words come from the embedded corpus of experiments.data (the Python standard
library's source by default; any `source` DataConfig accepts), split the way the LM data is split
(by a hash of each file's path): evaluation examples use the 'val' files, `train_examples` the
'train' files, and the split also tags the seed (see `Example.seed`), so the two never share a seed.

Lengths are tokens of the tokenizer given (`tokenizer=`): a `tokenizers.Tokenizer` (ids without
special tokens), an object with `.encode(text) -> ids` (experiments.data.Dataset) or a callable
text -> ids, like tasks.PasskeyTask.from_tokenizer's `encode`. Without one, a token is a UTF-8 byte
(the count under a byte-level tokenizer before merges; an upper bound for byte-level BPE). Every
prompt (context + SEP + question) has between length - length_tolerance(length) and length tokens.
A localization item is a line of its own at the filler line boundary nearest its depth, depth being
the fraction of filler tokens before it (0: right after the header, 1: after all the filler).

    exs = suite([1024, 4096], n_per_family=20, seed=0, tokenizer=ds)   # ds: data.Dataset
    context, query = exs[0].parts()    # query-agnostic: prefill context, compress, then query
    prompt = exs[0].prompt(query_aware=True)   # the question last (in the observation window)
    acc = score(exs[0], generated_text)  # in [0, 1]
    plot_grid(grid_accuracy(grid_exs, scores), "results/niah.png")  # tasks.plot_grid
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tokenizers

from experiments import data
from experiments.tasks import DIGITS, PasskeyTask

MIN_LENGTH = 64  # shortest prompt length a generator accepts, in tokens
SEP = "\n"  # between the context and the question: prompt = context + SEP + question
LOCALIZATION = frozenset({"needle", "multikey", "multivalue", "passkey", "vartrack"})
AGGREGATION = frozenset({"common_words", "frequent_words"})

Encoder = Callable[[str], Sequence[int]]  # text -> token ids

# RULER's templates (Hsieh et al. 2024, arXiv:2404.06654), the header being part of the context.
NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize it. I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_Q = ("What is the special magic number for {key} mentioned in the provided text? The "
            "special magic number for {key} mentioned in the provided text is")
MULTIVALUE_Q = ("What are all the special magic numbers for {key} mentioned in the provided text? "
                "The special magic numbers for {key} mentioned in the provided text are")
PASSKEY_HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.")
VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_Q = ("Question: Find all variables that are assigned the value {value} in the text above. "
        "Answer: According to the chain(s) of variable assignment in the text above, {n} "
        "variables are assigned the value {value}, they are:")
CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than "
              "others. Memorize the ones that appear most often.")
CWE_Q = ("Question: What are the {k} most common words in the above list? Answer: The top {k} "
         "words that appear most often in the list are:")
FWE_HEADER = ("Read the following text and track the frequency of each word. Find the {k} most "
              "frequently appeared words.")
FWE_Q = ("Question: What are the {k} most frequently appeared words in the above text? Answer: "
         "According to the text above, the {k} most frequently appeared words are:")

# tasks.py's text passkey, its phrases kept whole (an encoder that returns the text as one
# "token"), so both suites word the needle and the question alike.
_PK = PasskeyTask.from_tokenizer(lambda text: [text], ())
PASSKEY_NEEDLE = ("".join(_PK.needle_prefix).strip() + " {value}"
                  + "".join(_PK.needle_suffix).rstrip())  # "The pass key is {value}. Remember it."
PASSKEY_Q = "".join(_PK.query).strip()  # "What is the pass key? The pass key is"


def length_tolerance(length: int) -> int:
  """How many tokens a prompt may fall short of its target `length` (it never exceeds it)."""
  return max(32, length // 200)


@dataclasses.dataclass(frozen=True)
class Example:
  """One long-context task instance.

  Attributes:
    family: the task family (a key of FAMILIES).
    context: header and haystack (or word list); everything the model may see before the query.
    question: the query, which ends with the start of the answer.
    answer: the expected text (single-answer families) or the list of texts to find (multivalue,
      vartrack, common_words, frequent_words).
    length: tokens of prompt(query_aware=True) under the suite's tokenizer.
    depth: where the (asked / first) item sits, as a fraction of the filler tokens before it
      (0 = right after the header, 1 = after all filler); None for aggregation families.
    target_length: the length asked for.
    seed: the entropy the example was drawn from: (split index, family hash, seed, target length,
      index); data.SPLITS.index gives the split index, 0 train, 1 val.
    meta: family details (keys, placed depths, word counts) for analysis and tests.
  """
  family: str
  context: str
  question: str
  answer: str | list[str]
  length: int
  depth: float | None
  target_length: int
  seed: tuple[int, ...]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  def prompt(self, query_aware: bool = True) -> str:
    """The context then the question (query-aware: the question is in the last tokens, where the
    observation window of a SnapKV-like press sits), or the context alone (query-agnostic)."""
    return self.context + SEP + self.question if query_aware else self.context

  def parts(self) -> tuple[str, str]:
    """(context, query), query = SEP + question, so that "".join(parts()) == prompt(); for
    query-agnostic runs: prefill and compress the context, then feed the query."""
    return self.context, SEP + self.question

  @property
  def answers(self) -> list[str]:
    return [self.answer] if isinstance(self.answer, str) else list(self.answer)

  @property
  def target(self) -> str:
    """The continuation a model is trained to produce after prompt(): " a, b, c." (the answers
    in order, comma-separated, a full stop last); score(self, self.target) is 1."""
    return " " + ", ".join(self.answers) + "."


# --------------------------------------------------------------------------------------------------
# Scoring.


def _normalize(text: str) -> str:
  """Whitespace runs to one space, stripped, case-folded."""
  return " ".join(text.split()).casefold()


def score(example: Example, generated: str) -> float:
  """Exact score in [0, 1] of a model's continuation of example.prompt().

  Single answers (needle, multikey, passkey): 1 when the generation, whitespace normalised and
  case-folded, starts with the answer (leading punctuation such as quotes skipped) and no letter,
  digit or underscore follows it; generation may run on past the answer. Multiple answers: the
  fraction of them found as whole words anywhere in the generation (extras cost nothing).
  """
  gen = _normalize(generated)
  if isinstance(example.answer, str):
    gen = re.sub(r"^[^\w]+", "", gen)
    ans = _normalize(example.answer)
    return float(gen.startswith(ans) and re.match(r"\w", gen[len(ans):len(ans) + 1]) is None)
  answers = [_normalize(a) for a in example.answer]
  found = [re.search(rf"(?<!\w){re.escape(a)}(?!\w)", gen) is not None for a in answers]
  return sum(found) / len(answers) if answers else 1.0


def by_family(examples: Sequence[Example], scores: Sequence[float]) -> dict[str, float]:
  """Mean score per family, plus 'localization', 'aggregation' and 'all' over the examples."""
  groups: dict[str, list[float]] = {}
  for e, s in zip(examples, scores, strict=True):
    kind = "localization" if e.family in LOCALIZATION else "aggregation"
    for key in (e.family, kind, "all"):
      groups.setdefault(key, []).append(float(s))
  return {k: float(np.mean(v)) for k, v in groups.items()}


def grid_accuracy(examples: Sequence[Example], scores: Sequence[float]) -> dict:
  """Mean score on the depth x target-length grid of needle_grid examples, in the layout of
  tasks.evaluate_grid (for tasks.plot_grid / save_grid): accuracy[depth index][length index]."""
  cells: dict[tuple[float, int], list[float]] = {}
  for e, s in zip(examples, scores, strict=True):
    cells.setdefault((e.depth, e.target_length), []).append(float(s))
  depths = sorted({d for d, _ in cells})
  lengths = sorted({n for _, n in cells})
  acc = [[float(np.mean(cells.get((d, n), [np.nan]))) for n in lengths] for d in depths]
  return {"lengths": lengths, "depths": depths, "accuracy": acc,
          "samples": min(len(v) for v in cells.values()), "mean": float(np.nanmean(acc))}


# --------------------------------------------------------------------------------------------------
# Token counts and the corpus.


class _Counter:
  """Token counts of texts under the suite's tokenizer (see the module docstring)."""

  def __init__(self, tokenizer: Any):
    self._many = None
    if tokenizer is None:
      self._one = lambda s: len(s.encode("utf-8"))
    elif isinstance(tokenizer, tokenizers.Tokenizer):
      self._one = lambda s: len(tokenizer.encode(s, add_special_tokens=False).ids)
      self._many = lambda ss: [len(e.ids) for e in
                               tokenizer.encode_batch(list(ss), add_special_tokens=False)]
    elif callable(getattr(tokenizer, "encode", None)):
      self._one = lambda s: len(tokenizer.encode(s))
    elif callable(tokenizer):
      self._one = lambda s: len(tokenizer(s))
    else:
      raise TypeError(f"tokenizer must be None, a tokenizers.Tokenizer, an object with .encode or "
                      f"a callable text -> ids, got {type(tokenizer).__name__}")

  def __call__(self, text: str) -> int:
    return self._one(text)

  def many(self, texts: Sequence[str]) -> list[int]:
    return self._many(texts) if self._many else [self._one(t) for t in texts]


def count_tokens(text: str, tokenizer: Any = None) -> int:
  """Tokens of `text` as the suite counts them (UTF-8 bytes when tokenizer is None)."""
  return _Counter(tokenizer)(text)


@dataclasses.dataclass(frozen=True, eq=False)
class _Corpus:
  """One split of a corpus source as lines, each ending with a newline."""
  lines: tuple[str, ...]

  @functools.cached_property
  def words(self) -> tuple[str, ...]:
    """The distinct lower-case words of 4 to 10 letters, sorted."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", "".join(self.lines)))))


@functools.cache
def _corpus(source: str, split: str) -> _Corpus:
  """Reads the corpus through experiments.data (the same files and split as the LM data)."""
  docs = data._read_docs(source, None)
  docs = data._split_docs(docs, data.DataConfig(source=source).val_fraction, source)[split]
  text = "\n".join(d.text for d in docs).replace("\r", "")
  return _Corpus(tuple(line + "\n" for line in text.split("\n")))


def _window(rng: np.random.Generator, corpus: _Corpus, count: _Counter, n_tokens: int
            ) -> tuple[list[str], np.ndarray]:
  """Consecutive corpus lines from a random one (wrapping around) until their per-line token
  counts reach n_tokens; returns the lines and their counts [lines]."""
  lines, n = corpus.lines, len(corpus.lines)
  start = int(rng.integers(n))
  out, counts, total = [], [], 0
  while total < n_tokens:
    chunk = [lines[(start + len(out) + j) % n] for j in range(256)]
    out += chunk
    counts += count.many(chunk)
    total = sum(counts)
  return out, np.asarray(counts, np.int64)


class _Overflow(ValueError):
  """build(x) cannot make an x that large (too few distinct corpus words); x is too big."""


def _fit(build: Callable[[int], tuple[str, str]], count: _Counter, length: int, lo: int, hi: int,
         guess: int | None, what: str) -> tuple[int, str, str, int]:
  """Sets the integer knob x in [lo, hi] of build(x) -> (context, question) (tokens grow with x)
  so that the prompt has at most `length` tokens and, where the knob's steps allow, at least
  length - max(2, length // 1024): secant steps inside a shrinking bracket, bisection when a step
  leaves it; guess=None probes 2 lo + 16 first.

  Returns:
    (x, context, question, tokens) of the longest prompt found; tokens in
    [length - length_tolerance(length), length].
  """
  def measure(x):
    context, question = build(x)
    return count(context + SEP + question), x, context, question

  best = measure(lo)
  if best[0] > length:
    raise ValueError(f"length={length} is too short for {what}: its shortest prompt has "
                     f"{best[0]} tokens")
  x0, n0 = lo, best[0]
  x_lo, n_lo, x_hi, n_hi = lo, n0, hi + 1, None
  x = 2 * lo + 16 if guess is None else guess
  overflow = None
  close = max(2, length // 1024)  # good enough: stop searching
  for _ in range(64):
    if length - best[0] <= close or x_hi - x_lo <= 1:
      break
    if not x_lo < x < x_hi:
      x = (x_lo + x_hi) // 2
    try:
      cur = measure(x)
    except _Overflow as e:
      overflow, x_hi, n_hi = e, x, None
      x = (x_lo + x_hi) // 2
      continue
    if cur[0] <= length:
      x_lo, n_lo = x, cur[0]
      best = max(best, cur, key=lambda b: b[0])
    else:
      x_hi, n_hi = x, cur[0]
    if n_hi is None:  # extrapolate along the line through the start and the bracket's low end
      slope = (n_lo - n0) / (x_lo - x0) if x_lo > x0 else 0.0
      x = x_hi if slope <= 0 else x_lo + int((length - 1 - n_lo) / slope)
    else:  # interpolate inside the bracket
      x = x_lo + int((length - 1 - n_lo) * (x_hi - x_lo) / max(n_hi - n_lo, 1))
  if best[0] < length - length_tolerance(length):
    if overflow is not None:
      raise overflow
    raise RuntimeError(f"could not fit {what} to length={length}: the closest prompt has "
                       f"{best[0]} tokens")
  n, x, context, question = best
  return x, context, question, n


def _haystack(rng: np.random.Generator, env: _Env, header: str, items: Sequence[tuple[float, str]],
              question: str) -> tuple[str, str, int, list[float]]:
  """Context = header, then corpus lines with each item on a line of its own at its depth.

  Depths are fractions of the filler's tokens (per-line counts), each item going to the nearest
  line boundary (a stable sort keeps items at one boundary in the given order); the filler's
  character count is fitted to the length. Returns (context, question, tokens, placed depths).
  """
  fixed = env.count("\n".join([header, *(t for _, t in items), question]))
  budget = max(env.length - fixed, 0)
  lines, counts = _window(rng, env.corpus, env.count, budget + budget // 4 + 64)
  filler = "".join(lines)
  ends = np.cumsum([len(s) for s in lines])  # character offset of each line's end
  cum = np.cumsum(counts)  # tokens up to each line's end
  placed: list[float] = []

  def build(c: int) -> tuple[str, str]:
    m = int(np.searchsorted(ends, c, side="right"))  # whole lines within the first c characters
    bounds = np.array([0, *ends[:m], c])
    prefix = int(cum[m - 1]) if m else 0
    toks = np.array([0, *cum[:m], prefix + env.count(filler[bounds[-2]:c])], np.float64)
    at = [int(np.argmin(np.abs(toks - d * toks[-1]))) for d, _ in items]
    placed[:] = [float(toks[j] / toks[-1]) if toks[-1] else 0.0 for j in at]
    pieces, prev = [header, "\n"], 0
    for j, (_, text) in sorted(zip(at, items), key=lambda p: p[0]):
      pos = int(bounds[j])
      pieces.append(filler[prev:pos])
      if pos and filler[pos - 1] != "\n":
        pieces.append("\n")
      pieces += [text, "\n"]
      prev = pos
    pieces.append(filler[prev:c])  # not stripped: tokens must grow with c, steadily
    return "".join(pieces), question

  guess = int(ends[min(int(np.searchsorted(cum, budget)), len(ends) - 1)])
  c, context, question, n = _fit(build, env.count, env.length, 0, len(filler), guess, env.family)
  build(c)  # the placements of the prompt kept (the last build may have been another)
  return context, question, n, list(placed)


# --------------------------------------------------------------------------------------------------
# Generation plumbing.


@dataclasses.dataclass(frozen=True, eq=False)
class _Env:
  """What a family's one-example builder needs."""
  family: str
  length: int
  corpus: _Corpus
  count: _Counter


# (rng, env, depth) -> (context, question, answer, tokens, meta)
_One = Callable[[np.random.Generator, _Env, float | None], tuple[str, str, Any, int, dict]]


def _check(n: int, length: int, seed: int, depth: float | None, split: str) -> None:
  if not isinstance(length, int | np.integer) or length < MIN_LENGTH:
    raise ValueError(f"length={length!r} must be an integer >= {MIN_LENGTH} tokens")
  if depth is not None and not 0.0 <= float(depth) <= 1.0:
    raise ValueError(f"depth={depth!r} is outside [0, 1]")
  if not isinstance(n, int | np.integer) or n < 0:
    raise ValueError(f"n={n!r} must be an integer >= 0")
  if not isinstance(seed, int | np.integer) or seed < 0:
    raise ValueError(f"seed={seed!r} must be an integer >= 0")
  if split not in data.SPLITS:
    raise ValueError(f"split={split!r} is not one of {data.SPLITS}")


def _generate(family: str, n: int, length: int, seed: int, depth: float | None, tokenizer: Any,
              source: str, split: str, one: _One, uses_depth: bool = True,
              depth_range: tuple[float, float] = (0.0, 1.0)) -> list[Example]:
  """n examples of a family; example i depends only on (split, family, seed, length, i, depth,
  depth_range). Without a depth, each example's is uniform on depth_range."""
  _check(n, length, seed, depth, split)
  lo, hi = map(float, depth_range)
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"depth_range={tuple(depth_range)} must satisfy 0 <= low <= high <= 1")
  if depth is not None and not uses_depth:
    raise ValueError(f"depth={depth!r} has no meaning for {family} (aggregation); pass None")
  env = _Env(family, int(length), _corpus(source, split), _Counter(tokenizer))
  out = []
  for i in range(n):
    entropy = (data.SPLITS.index(split), zlib.crc32(family.encode()), int(seed), int(length), i)
    rng = np.random.default_rng(entropy)
    drawn = float(rng.random())  # always drawn: a given depth leaves the rest of the draw alike
    d = (lo + (hi - lo) * drawn if depth is None else float(depth)) if uses_depth else None
    context, question, answer, tokens, meta = one(rng, env, d)
    out.append(Example(family, context, question, answer, tokens, d, int(length), entropy, meta))
  return out


def _words(env: _Env, k: int) -> tuple[str, ...]:
  if len(env.corpus.words) < k:
    raise ValueError(f"the corpus has {len(env.corpus.words)} distinct words, {env.family} "
                     f"needs {k}")
  return env.corpus.words


def _keys(rng: np.random.Generator, env: _Env, k: int) -> list[str]:
  """k distinct keys, each two corpus words joined by a hyphen."""
  words, keys = _words(env, 2), []
  while len(keys) < k:
    a, b = rng.choice(len(words), 2, replace=False)
    if (key := f"{words[a]}-{words[b]}") not in keys:
      keys.append(key)
  return keys


def _numbers(rng: np.random.Generator, k: int, digits: int = 7) -> list[str]:
  """k distinct numbers of `digits` digits (no leading zero)."""
  values = rng.choice(9 * 10 ** (digits - 1), k, replace=False) + 10 ** (digits - 1)
  return [str(int(v)) for v in values]


# --------------------------------------------------------------------------------------------------
# Localization families.


def needle(n: int, length: int, *, seed: int, depth: float | None = None, tokenizer: Any = None,
           source: str = "stdlib", split: str = "val",
           depth_range: tuple[float, float] = (0.0, 1.0)) -> list[Example]:
  """Single needle (RULER niah_single): one key's 7-digit magic number at `depth`; ask it.

  Args:
    n: examples; length: target prompt tokens (>= MIN_LENGTH); seed: >= 0; depth: in [0, 1],
    if None uniform per example on depth_range; tokenizer, source, split: see the module
    docstring.
  """
  def one(rng, env, d):
    (key,), (value,) = _keys(rng, env, 1), _numbers(rng, 1)
    ctx, q, tokens, placed = _haystack(rng, env, NIAH_HEADER, [(d, NEEDLE.format(
        key=key, value=value))], NEEDLE_Q.format(key=key))
    return ctx, q, value, tokens, {"key": key, "placed": placed}
  return _generate("needle", n, length, seed, depth, tokenizer, source, split, one,
                   depth_range=depth_range)


def multikey(n: int, length: int, *, seed: int, depth: float | None = None, tokenizer: Any = None,
             source: str = "stdlib", split: str = "val", num_keys: int = 4) -> list[Example]:
  """Several needles with distinct keys (RULER niah_multikey_1); the asked one at `depth`, the
  others at random depths. num_keys: needles in the haystack, >= 1."""
  def one(rng, env, d):
    keys, values = _keys(rng, env, num_keys), _numbers(rng, num_keys)
    depths = [d, *rng.random(num_keys - 1)]
    items = [(x, NEEDLE.format(key=k, value=v)) for x, k, v in zip(depths, keys, values)]
    ctx, q, tokens, placed = _haystack(rng, env, NIAH_HEADER, items, NEEDLE_Q.format(key=keys[0]))
    return ctx, q, values[0], tokens, {"key": keys[0], "keys": keys, "values": values,
                                       "placed": placed}
  if num_keys < 1:
    raise ValueError(f"num_keys={num_keys} must be >= 1")
  return _generate("multikey", n, length, seed, depth, tokenizer, source, split, one)


def multivalue(n: int, length: int, *, seed: int, depth: float | None = None,
               tokenizer: Any = None, source: str = "stdlib", split: str = "val",
               num_values: int = 4) -> list[Example]:
  """One key with several values, each in its own needle (RULER niah_multivalue); ask all. The
  first needle sits at `depth`, the others at random depths. num_values: >= 1."""
  def one(rng, env, d):
    (key,), values = _keys(rng, env, 1), _numbers(rng, num_values)
    depths = [d, *rng.random(num_values - 1)]
    items = [(x, NEEDLE.format(key=key, value=v)) for x, v in zip(depths, values)]
    ctx, q, tokens, placed = _haystack(rng, env, NIAH_HEADER, items, MULTIVALUE_Q.format(key=key))
    return ctx, q, values, tokens, {"key": key, "placed": placed}
  if num_values < 1:
    raise ValueError(f"num_values={num_values} must be >= 1")
  return _generate("multivalue", n, length, seed, depth, tokenizer, source, split, one)


def passkey(n: int, length: int, *, seed: int, depth: float | None = None, tokenizer: Any = None,
            source: str = "stdlib", split: str = "val") -> list[Example]:
  """Passkey retrieval in tasks.py's text wording ("The pass key is 48213. Remember it.", "What
  is the pass key? The pass key is"), its value_digits digits drawn as tasks.PasskeyTask does, as
  a text prompt in corpus filler (tasks.PasskeyTask itself builds token sequences for training)."""
  def one(rng, env, d):
    value = "".join(rng.choice(list(DIGITS), _PK.value_digits))
    ctx, q, tokens, placed = _haystack(rng, env, PASSKEY_HEADER,
                                       [(d, PASSKEY_NEEDLE.format(value=value))], PASSKEY_Q)
    return ctx, q, value, tokens, {"placed": placed}
  return _generate("passkey", n, length, seed, depth, tokenizer, source, split, one)


def vartrack(n: int, length: int, *, seed: int, depth: float | None = None, tokenizer: Any = None,
             source: str = "stdlib", split: str = "val", num_chains: int = 1,
             num_hops: int = 4) -> list[Example]:
  """Variable tracking (RULER vt): chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... of
  num_hops assignments after the first; ask which num_hops + 1 variables hold the first chain's
  value. Its first statement sits at `depth`, the later ones in order at random depths in
  [depth, 1]; the other num_chains - 1 chains (distractors, other values) anywhere, in order."""
  def one(rng, env, d):
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
      if (name := "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5))) not in names:
        names.append(name)
    values = _numbers(rng, num_chains, digits=5)
    items = []
    for c in range(num_chains):
      chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
      text = [f"VAR {chain[0]} = {values[c]}"] + [f"VAR {b} = VAR {a}" for a, b in
                                                  zip(chain, chain[1:])]
      depths = ([d, *np.sort(d + (1 - d) * rng.random(num_hops))] if c == 0
                else np.sort(rng.random(num_hops + 1)))
      items += list(zip(map(float, depths), text))
    q = VT_Q.format(value=values[0], n=num_hops + 1)
    ctx, q, tokens, placed = _haystack(rng, env, VT_HEADER, items, q)
    answer = names[:num_hops + 1]
    return ctx, q, answer, tokens, {"value": values[0], "placed": placed}
  if num_chains < 1 or num_hops < 1:
    raise ValueError(f"num_chains={num_chains} and num_hops={num_hops} must be >= 1")
  return _generate("vartrack", n, length, seed, depth, tokenizer, source, split, one)


# --------------------------------------------------------------------------------------------------
# Aggregation families.


def _word_list(rng: np.random.Generator, env: _Env, k: int,
               entries: Callable[[int, np.ndarray, int], tuple[np.ndarray, dict]],
               body: Callable[[list[str]], str], header: str, question: str, min_size: int,
               keep_meta: Callable[[dict], dict]):
  """The aggregation families' list: `entries(size, perm, n_words)` picks word indices (and their
  meta) for a list of `size` words, shuffled per size; `body` writes the words out. The size is
  fitted to the length; the answer is the first k words of the permutation."""
  words = _words(env, k + 1)
  perm = rng.permutation(len(words))
  order_seed = int(rng.integers(2**62))
  meta: dict[str, Any] = {}

  def build(size: int) -> tuple[str, str]:
    picked, info = entries(size, perm, len(words))
    picked = np.random.default_rng([order_seed, size]).permutation(picked)
    meta.update(info)
    return header + "\n" + body([words[w] for w in picked]), question

  size, ctx, q, tokens = _fit(build, env.count, env.length, min_size, env.length, None,
                              env.family)
  build(size)  # meta of the list kept
  return ctx, q, [words[w] for w in perm[:k]], tokens, keep_meta(dict(meta))


def common_words(n: int, length: int, *, seed: int, depth: None = None, tokenizer: Any = None,
                 source: str = "stdlib", split: str = "val", k: int = 10, common_freq: int = 30,
                 uncommon_freq: int = 3) -> list[Example]:
  """Common words extraction (RULER cwe): a numbered list "1. word 2. word ..." of corpus words
  in which k words appear c times and the others at most u times; ask the k common words.
  c = common_freq, lowered to half the list over k on short lists but kept above u;
  u = uncommon_freq, raised when the corpus has too few distinct words for the list (always
  below c, so the answer is unique). The list's size is fitted to the length."""
  def entries(size: int, perm: np.ndarray, n_words: int) -> tuple[np.ndarray, dict]:
    c = max(uncommon_freq + 1, min(common_freq, size // (2 * k)))
    rest = size - k * c
    u = max(uncommon_freq, -(-rest // (n_words - k)))  # more repeats when words run short
    if u >= c:
      raise _Overflow(f"the corpus has {n_words} distinct words, too few for common_words "
                      f"at length={length}")
    m = -(-rest // u)  # distinct uncommon words
    picked = np.concatenate([np.repeat(perm[:k], c), np.repeat(perm[k:k + m], u)[:rest]])
    return picked, dict(common=c, uncommon=u, size=size)

  def one(rng, env, _):
    return _word_list(rng, env, k, entries, lambda ws: " ".join(
        f"{i + 1}. {w}" for i, w in enumerate(ws)), CWE_HEADER, CWE_Q.format(k=k),
        k * (uncommon_freq + 1), lambda meta: meta)
  if not 1 <= uncommon_freq < common_freq or k < 1:
    raise ValueError(f"need k >= 1 and 1 <= uncommon_freq < common_freq, got k={k}, "
                     f"uncommon_freq={uncommon_freq}, common_freq={common_freq}")
  return _generate("common_words", n, length, seed, depth, tokenizer, source, split, one,
                   uses_depth=False)


def zipf_counts(size: int, k: int, alpha: float) -> list[int]:
  """Word counts, most frequent first, of a list of about `size` words whose frequencies follow
  Zipf's law (count of rank r ~ size * r^-alpha / H); the remainder of the rounding goes to more
  words once each, and the top k + 1 counts are made strictly decreasing, so the k most frequent
  words are well defined (which may add a few words to a short list)."""
  ranks = np.arange(1, size + 1, dtype=np.float64)
  w = ranks ** -alpha
  counts = [int(c) for c in np.floor(size * w / w.sum()) if c > 0]
  counts += [1] * (size - sum(counts))
  counts += [0] * max(0, k + 1 - len(counts))
  for i in range(k - 1, -1, -1):
    counts[i] = max(counts[i], counts[i + 1] + 1)
  return [c for c in counts if c > 0]


def frequent_words(n: int, length: int, *, seed: int, depth: None = None, tokenizer: Any = None,
                   source: str = "stdlib", split: str = "val", k: int = 3, alpha: float = 2.0
                   ) -> list[Example]:
  """Frequent words extraction (RULER fwe): corpus words with Zipf(alpha) frequencies
  (zipf_counts) in random order; ask the k most frequent. The word count is fitted to the
  length."""
  def entries(size: int, perm: np.ndarray, n_words: int) -> tuple[np.ndarray, dict]:
    counts = zipf_counts(size, k, alpha)
    if len(counts) > n_words:
      raise _Overflow(f"the corpus has {n_words} distinct words, too few for "
                      f"frequent_words at length={length} (needs {len(counts)})")
    return np.repeat(perm[:len(counts)], counts), dict(counts=counts, size=size)

  def one(rng, env, _):
    return _word_list(rng, env, k, entries, " ".join, FWE_HEADER.format(k=k), FWE_Q.format(k=k),
                      1, lambda meta: {"counts": meta["counts"][:k + 1]})
  if k < 1 or alpha <= 0:
    raise ValueError(f"need k >= 1 and alpha > 0, got k={k}, alpha={alpha}")
  return _generate("frequent_words", n, length, seed, depth, tokenizer, source, split, one,
                   uses_depth=False)


# --------------------------------------------------------------------------------------------------
# The suite.

FAMILIES: dict[str, Callable[..., list[Example]]] = {
    "needle": needle, "multikey": multikey, "multivalue": multivalue, "passkey": passkey,
    "vartrack": vartrack, "common_words": common_words, "frequent_words": frequent_words}


def family(name: str) -> Callable[..., list[Example]]:
  """The generator of a family name."""
  if name not in FAMILIES:
    raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def generate(name: str, n: int, length: int, *, seed: int, **kwargs) -> list[Example]:
  """FAMILIES[name](n, length, seed=seed, **kwargs), with a ValueError for an unknown name."""
  return family(name)(n, length, seed=seed, **kwargs)


def needle_grid(lengths: Sequence[int], depths: Sequence[float], n_per_cell: int, seed: int,
                **kwargs) -> list[Example]:
  """needle examples on a depth x length grid, n_per_cell per cell, for grid_accuracy.

  The draw ignores the depth, so at one length every depth gets the same haystacks and needles:
  cells of a length differ only in where the needle sits. kwargs go to needle (tokenizer, ...).
  """
  return [e for length in lengths for d in depths
          for e in needle(n_per_cell, length, seed=seed, depth=d, **kwargs)]


def suite(lengths: Sequence[int], n_per_family: int, seed: int, *,
          families: Sequence[str] | None = None, split: str = "val", **kwargs) -> list[Example]:
  """n_per_family examples of every family (or of `families`) at every length, ordered by
  length, then family, then index; depths of localization tasks drawn per example.

  Args:
    lengths: target prompt lengths in tokens, each >= MIN_LENGTH.
    n_per_family: examples per family and length.
    seed: >= 0; the same seed gives the same suite.
    families: family names (default all of FAMILIES).
    split: 'val' for evaluation (default); train_examples uses 'train'.
    **kwargs: tokenizer, source.
  """
  names = list(FAMILIES) if families is None else list(families)
  gens = [family(name) for name in names]
  return [e for length in lengths for g in gens
          for e in g(n_per_family, length, seed=seed, split=split, **kwargs)]


def train_examples(n: int, lengths: Sequence[int], seed: int, *,
                   families: Sequence[str] | None = None, **kwargs) -> list[Example]:
  """n training examples, the (family, length) cells taken in turn, so any prefix is balanced.

  Disjoint from evaluation by construction: the filler and words come from the corpus' 'train'
  files (evaluation: 'val'), and every example's seed entropy starts with the split's index
  (0 train, 1 val; Example.seed), so no train example shares a seed with an eval example
  whatever the seeds passed. kwargs: tokenizer, source.
  """
  names = list(FAMILIES) if families is None else list(families)
  cells = [(name, length) for length in lengths for name in names]
  if not cells:
    raise ValueError(f"need at least one family and length, got families={names}, "
                     f"lengths={list(lengths)}")
  per = [n // len(cells) + (i < n % len(cells)) for i in range(len(cells))]
  drawn = [family(name)(m, length, seed=seed, split="train", **kwargs)
           for (name, length), m in zip(cells, per)]
  return [drawn[c][i] for i in range(max(per, default=0)) for c in range(len(cells))
          if i < len(drawn[c])]
