"""Verifiable multi-step reasoning tasks for tree search (ETS): Countdown and word problems.

Two families share one `Problem` type, one text format and exact checkers:
- countdown: reach a target from given numbers with + - * /, one operation per step; a step
  consumes its two operands and adds its result, every value a positive integer (a - b only when
  a > b, a / b only when exact). Problems are generated from a sampled solution, so each one is
  solvable; `solvable` is an exact solver (memoised over sub-multisets).
- arithmetic: word problems from short templates ("Ann has 12 apples. She buys 3 bags with 4
  apples in each bag. ..."); one operation per step ("3 * 4 = 12", then "12 + 12 = 24"); operands
  are numbers of the problem or earlier results (reuse allowed); the answer is an exact integer.

Text format (what the policy trains on and generates; `format_solution`):

    numbers: 3 7 25 50 | target: 225     <- the prompt (one line)
    50 + 25 = 75                         <- steps, "a op b = c", one per line
    75 * 3 = 225
    answer: 225                          <- ANSWER then the integer

STEP = "\\n" ends the prompt, every step and the answer line. Under the project's byte-level BPE
(experiments.data: ByteLevel pre-tokenizer, GPT-2 split pattern) a lone newline before a digit or
a letter is its own pre-token, and the byte alphabet makes it a single token, so the step
boundary is one token id (`step_token_id`); steps never begin with whitespace and no line is
blank, so "\\n\\n"-style merges never occur.

Labels (`check_steps` -> one `StepCheck` per step):
- valid: the step parses, its operands are available (countdown: in the remaining multiset, as
  the trace has written it; arithmetic: problem numbers or earlier results) and its arithmetic
  is right under the family's rules.
- reachable: the PRM label. Countdown: every step so far is valid and the target can still be
  reached from the remaining numbers (irreversible: once False, False for the rest). Arithmetic
  (nothing is consumed, so the answer always stays reachable): every step so far is valid and
  this step computes a quantity the reference solution computes (a result of one of its steps);
  a valid detour ("dead end") is False, later on-track steps are True again. The check is by
  value, so a detour that happens to equal a needed quantity counts as on track.

Difficulty knobs:
- CountdownSpec: n_numbers (2-6; 6 with target_range up to ~1000 is hard), number_range,
  target_range, allow_division, min_steps (the shortest solution needs at least this many
  operations; larger is harder).
- ArithmeticSpec: n_steps (operations in the reference, 1-8), start_range and value_range (the
  numbers in the text), max_value (cap on every intermediate), allow_division.

    probs = countdown(100, CountdownSpec(n_numbers=5), seed=0)
    text = format_solution(probs[0], probs[0].solution, probs[0].target)
    trace = noisy_trace(probs[0], np.random.default_rng(1), error_rate=0.2)
    labels = [c.reachable for c in trace.checks]      # PRM targets
    ok = check_answer(probs[0], generated_text)        # exact scorer
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import re
from collections.abc import Callable, Sequence

import numpy as np

STEP = "\n"  # ends the prompt, each step and the answer line; one token under byte-level BPE
ANSWER = "answer:"  # the answer line is f"{ANSWER} {n}"
FAMILIES = ("countdown", "arithmetic")
MAX_NUMBERS = 6  # the exact solver stays fast (well under a second) up to here
MAX_ATTEMPTS = 2000  # samples tried per problem before a spec is declared too tight

_STEP_RE = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER_RE = re.compile(re.escape(ANSWER) + r"\s*(-?\d+)")

Move = tuple[int, str, int, int]  # (a, op, b, c): the step "a op b = c"


@dataclasses.dataclass(frozen=True)
class Problem:
  """One task instance.

  Attributes:
    family: "countdown" or "arithmetic".
    prompt: the question, one ASCII line without STEP.
    numbers: countdown: the starting multiset (sorted); arithmetic: the numbers of the text, in
      order of appearance.
    target: the answer: the countdown target or the word problem's result.
    solution: one reference solution, steps "a op b = c" (may be empty for a hand-made countdown
      problem; an arithmetic problem needs one: its step results define the needed quantities).
    allow_division: countdown rule (arithmetic problems only divide when generated with it).
  """
  family: str
  prompt: str
  numbers: tuple[int, ...]
  target: int
  solution: tuple[str, ...] = ()
  allow_division: bool = True

  @classmethod
  def countdown(cls, numbers: Sequence[int], target: int, solution: Sequence[str] = (),
                allow_division: bool = True) -> Problem:
    """A countdown problem from its numbers and target (the prompt is built here)."""
    nums = tuple(sorted(int(x) for x in numbers))
    prompt = f"numbers: {' '.join(map(str, nums))} | target: {int(target)}"
    return cls("countdown", prompt, nums, int(target), tuple(solution), allow_division)


@dataclasses.dataclass(frozen=True)
class StepCheck:
  """The checker's verdict on one step (see the module docstring).

  Attributes:
    valid: the step alone is right: parses, uses available numbers, correct arithmetic.
    reachable: the PRM label: the trace up to here is still on the way to the answer.
  """
  valid: bool
  reachable: bool


@dataclasses.dataclass(frozen=True)
class Trace:
  """A noisy solution trace for policy and PRM training.

  Attributes:
    steps: the steps, "a op b = c".
    checks: check_steps(problem, steps), one per step.
    errors: which steps were written as errors (wrong arithmetic or a dead-end move).
    answer: the answer the trace ends with (wrong when an error derailed it).
  """
  steps: tuple[str, ...]
  checks: tuple[StepCheck, ...]
  errors: tuple[bool, ...]
  answer: int


# --------------------------------------------------------------------------------------------------
# Specs.


def _check_range(name: str, r: tuple[int, int], low: int) -> None:
  if len(r) != 2 or r[0] > r[1] or r[0] < low:
    raise ValueError(f"{name}={r} must be (lo, hi) with {low} <= lo <= hi")


@dataclasses.dataclass(frozen=True)
class CountdownSpec:
  """Countdown generator settings; ranges are inclusive."""
  n_numbers: int = 4  # numbers given (2-6)
  number_range: tuple[int, int] = (1, 25)  # each given number
  target_range: tuple[int, int] = (10, 200)  # the target
  allow_division: bool = True  # exact division allowed as an operation
  min_steps: int = 2  # the shortest solution needs at least this many operations
  seed: int = 0  # default seed of `countdown`

  def __post_init__(self):
    if not 2 <= self.n_numbers <= MAX_NUMBERS:
      raise ValueError(f"CountdownSpec.n_numbers={self.n_numbers} must be in [2, {MAX_NUMBERS}]")
    _check_range("CountdownSpec.number_range", self.number_range, 1)
    _check_range("CountdownSpec.target_range", self.target_range, 1)
    if not 1 <= self.min_steps <= self.n_numbers - 1:
      raise ValueError(f"CountdownSpec.min_steps={self.min_steps} must be in "
                       f"[1, n_numbers - 1 = {self.n_numbers - 1}]")


@dataclasses.dataclass(frozen=True)
class ArithmeticSpec:
  """Word-problem generator settings; ranges are inclusive."""
  n_steps: int = 3  # operations in the reference solution (1-8)
  start_range: tuple[int, int] = (5, 40)  # the starting amount
  value_range: tuple[int, int] = (2, 12)  # every other number in the text
  max_value: int = 500  # every intermediate result stays in [1, max_value]
  allow_division: bool = True  # templates that divide (exactly) may be used
  seed: int = 0  # default seed of `arithmetic`

  def __post_init__(self):
    if not 1 <= self.n_steps <= 8:
      raise ValueError(f"ArithmeticSpec.n_steps={self.n_steps} must be in [1, 8]")
    _check_range("ArithmeticSpec.start_range", self.start_range, 1)
    _check_range("ArithmeticSpec.value_range", self.value_range, 2)
    if self.max_value < max(self.start_range[1], self.value_range[1]):
      raise ValueError(f"ArithmeticSpec.max_value={self.max_value} is below the ranges "
                       f"{self.start_range}, {self.value_range}")


# --------------------------------------------------------------------------------------------------
# Arithmetic rules and the exact Countdown solver.


def apply_op(a: int, op: str, b: int, allow_division: bool = True) -> int | None:
  """a op b under the rules (positive integer results, exact division), or None if illegal."""
  if op == "+":
    return a + b
  if op == "*":
    return a * b
  if op == "-":
    return a - b if a > b else None
  if op == "/":
    return a // b if allow_division and b > 0 and a % b == 0 else None
  return None


def _pair_results(a: int, b: int, division: bool) -> list[Move]:
  """Every legal step on the unordered pair {a, b}, larger operand first for - and /."""
  hi, lo = max(a, b), min(a, b)
  out = [(hi, "+", lo, hi + lo), (hi, "*", lo, hi * lo)]
  if hi > lo:
    out.append((hi, "-", lo, hi - lo))
  if division and lo > 0 and hi % lo == 0:
    out.append((hi, "/", lo, hi // lo))
  return out


@functools.lru_cache(maxsize=1 << 12)
def _splits(ms: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
  """Unordered splits of a sorted multiset into two non-empty sorted sub-multisets."""
  n, seen = len(ms), set()
  for mask in range(1, 1 << (n - 1)):  # element n-1 always on the right: each split once
    left = tuple(ms[i] for i in range(n) if mask >> i & 1)
    right = tuple(ms[i] for i in range(n) if not mask >> i & 1)
    key = (left, right) if left <= right else (right, left)
    seen.add(key)
  return tuple(sorted(seen))


@functools.lru_cache(maxsize=1 << 15)
def _values(ms: tuple[int, ...], division: bool) -> frozenset[int]:
  """Values of every expression that uses each number of the sorted multiset ms exactly once."""
  if len(ms) == 1:
    return frozenset(ms)
  out: set[int] = set()
  for left, right in _splits(ms):
    vr = _values(right, division)
    for a in _values(left, division):
      for b in vr:
        out.add(a + b)
        out.add(a * b)
        if a != b:
          out.add(abs(a - b))
        if division:
          if a % b == 0:
            out.add(a // b)
          elif b % a == 0:
            out.add(b // a)
  return frozenset(out)


def _submultisets(ms: tuple[int, ...], size: int) -> list[tuple[int, ...]]:
  return sorted(set(itertools.combinations(ms, size)))


def _sorted(numbers: Sequence[int]) -> tuple[int, ...]:
  nums = tuple(sorted(int(x) for x in numbers))
  if any(x < 1 for x in nums):
    raise ValueError(f"countdown numbers must be positive integers, got {list(numbers)}")
  return nums


def shortest_steps(numbers: Sequence[int], target: int, allow_division: bool = True,
                   max_steps: int | None = None) -> int | None:
  """Fewest operations that reach target from numbers (0 if it is one of them), or None if it
  is unreachable (within max_steps operations, when given)."""
  ms = _sorted(numbers)
  top = len(ms) if max_steps is None else min(len(ms), max_steps + 1)
  for size in range(1, top + 1):  # smallest sub-multisets first: an early exit when reachable
    if any(target in _values(s, allow_division) for s in _submultisets(ms, size)):
      return size - 1
  return None


def solvable(numbers: Sequence[int], target: int, allow_division: bool = True) -> bool:
  """Exact: can a sequence of steps on numbers produce target (the target given counts)?"""
  return shortest_steps(numbers, target, allow_division) is not None


def _decompose(ms: tuple[int, ...], t: int, division: bool, rng: np.random.Generator
               ) -> list[Move]:
  """Moves that build t from all of ms (t in _values(ms)), choosing randomly among the ways."""
  if len(ms) == 1:
    return []
  cands = []
  for left, right in _splits(ms):
    vr = _values(right, division)
    for a in _values(left, division):
      for b in {t - a, t // a if t % a == 0 else 0, a - t, a + t, a // t if a % t == 0 else 0,
                a * t}:
        if b > 0 and b in vr:
          cands += [(left, right, a, b, m) for m in _pair_results(a, b, division) if m[3] == t]
  left, right, a, b, move = cands[int(rng.integers(len(cands)))]
  parts = [_decompose(left, a, division, rng), _decompose(right, b, division, rng)]
  if rng.random() < 0.5:
    parts.reverse()
  return parts[0] + parts[1] + [move]


def solve(numbers: Sequence[int], target: int, rng: np.random.Generator | None = None,
          allow_division: bool = True, shortest: bool = True) -> list[str] | None:
  """One solution as steps, [] if target is among numbers, None if it is unreachable.

  Args:
    numbers, target, allow_division: the countdown instance.
    rng: randomness for the choice among solutions (a fixed one when None).
    shortest: a solution with the fewest steps; else one over a random sub-multiset of the
      numbers from which target can be made (any length).
  """
  ms = _sorted(numbers)
  k = shortest_steps(ms, target, allow_division)
  if k is None:
    return None
  rng = rng if rng is not None else np.random.default_rng(0)
  sizes = [k + 1] if shortest else range(k + 1, len(ms) + 1)
  subs = [s for n in sizes for s in _submultisets(ms, n) if target in _values(s, allow_division)]
  sub = subs[int(rng.integers(len(subs)))]
  return [format_step(m) for m in _decompose(sub, target, allow_division, rng)]


# --------------------------------------------------------------------------------------------------
# Text: steps, answers, solutions.


def format_step(move: Move) -> str:
  """(a, op, b, c) -> "a op b = c"."""
  a, op, b, c = move
  return f"{a} {op} {b} = {c}"


def parse_step(step: str) -> Move | None:
  """ "a op b = c" -> (a, op, b, c) (non-negative operands, signed result), None otherwise."""
  m = _STEP_RE.match(step)
  if m is None:
    return None
  return int(m[1]), m[2], int(m[3]), int(m[4])


def format_solution(problem: Problem, steps: Sequence[str], answer: int) -> str:
  """The training text: the prompt, each step and the answer line, each ending with STEP."""
  return "".join(line + STEP for line in (problem.prompt, *steps, f"{ANSWER} {answer}"))


def parse_solution(problem: Problem, text: str) -> tuple[list[str], int | None]:
  """Generated text (with or without the prompt) -> (steps, answer).

  Steps are the non-blank lines before the first line holding ANSWER; the answer is the first
  integer after ANSWER on that line (None without an answer line); what follows is ignored.
  """
  if text.startswith(problem.prompt):
    text = text[len(problem.prompt):]
  steps = []
  for line in text.split(STEP):
    m = _ANSWER_RE.search(line)
    if m is not None:
      return steps, int(m[1])
    if line.strip():
      steps.append(line.strip())
  return steps, None


def step_token_id(encode: Callable[[str], Sequence[int]]) -> int:
  """The id of STEP under a tokenizer's encode (text -> ids); ValueError unless it is one."""
  ids = list(encode(STEP))
  if len(ids) != 1:
    raise ValueError(f"STEP={STEP!r} encodes to {len(ids)} tokens {ids}, not one")
  return ids[0]


# --------------------------------------------------------------------------------------------------
# Checkers.


def _countdown_walk(problem: Problem, steps: Sequence[str]
                    ) -> tuple[list[StepCheck], collections.Counter]:
  """Replays steps on the multiset: the checks and the final multiset as written."""
  state = collections.Counter(problem.numbers)
  ok, checks = True, []
  for step in steps:
    move = parse_step(step)
    valid = False
    if move is not None:
      a, op, b, c = move
      need = collections.Counter([a, b])
      if all(state[x] >= n for x, n in need.items()):
        valid = c == apply_op(a, op, b, problem.allow_division)
        state -= need
        state[c] += 1  # applied as written, a wrong result too: later steps may use it
    ok = ok and valid
    reach = ok and solvable(list(state.elements()), problem.target, problem.allow_division)
    ok = reach
    checks.append(StepCheck(valid, reach))
  return checks, state


def _needed(problem: Problem) -> set[int]:
  """The quantities an arithmetic problem's reference computes (its steps' results)."""
  moves = [parse_step(s) for s in problem.solution]
  if not moves or any(m is None for m in moves):
    raise ValueError(f"arithmetic problem {problem.prompt!r} needs a reference solution of steps "
                     f"'a op b = c', got {list(problem.solution)}")
  return {m[3] for m in moves}


def _arithmetic_checks(problem: Problem, steps: Sequence[str]) -> list[StepCheck]:
  needed = _needed(problem)
  avail = set(problem.numbers)
  ok, checks = True, []
  for step in steps:
    move = parse_step(step)
    valid = on_track = False
    if move is not None:
      a, op, b, c = move
      if a in avail and b in avail:
        valid = c == apply_op(a, op, b, True)
        avail.add(c)  # as written: later steps may build on a wrong result
      ok = ok and valid
      on_track = ok and c in needed
    ok = ok and valid
    checks.append(StepCheck(valid, on_track))
  return checks


def check_steps(problem: Problem, steps: Sequence[str]) -> list[StepCheck]:
  """Per-step verdicts (valid, reachable); see the module docstring for their meaning.

  Args:
    problem: the problem the steps answer.
    steps: step strings "a op b = c" (surrounding whitespace ignored).
  Returns:
    one StepCheck per step.
  """
  if problem.family == "countdown":
    return _countdown_walk(problem, steps)[0]
  if problem.family == "arithmetic":
    return _arithmetic_checks(problem, steps)
  raise ValueError(f"unknown family {problem.family!r}; expected one of {FAMILIES}")


def check_answer(problem: Problem, text: str) -> bool:
  """Exact scorer of a generated solution text.

  Arithmetic: the answer line's integer is the answer. Countdown (where the answer is in the
  prompt): also, every step is valid and the steps leave the target among the numbers.
  """
  steps, answer = parse_solution(problem, text)
  if answer != problem.target:
    return False
  if problem.family == "arithmetic":
    return True
  checks, state = _countdown_walk(problem, steps)
  return bool(steps) and all(c.valid for c in checks) and state[problem.target] > 0


def validate(problem: Problem) -> None:
  """Raises ValueError("... has no solution") unless the problem is well-formed and solvable
  (and its reference solution, if any, is correct)."""
  if problem.family not in FAMILIES:
    raise ValueError(f"unknown family {problem.family!r}; expected one of {FAMILIES}")
  if STEP in problem.prompt:
    raise ValueError(f"prompt {problem.prompt!r} must not contain STEP={STEP!r}")
  if problem.family == "countdown":
    if not solvable(problem.numbers, problem.target, problem.allow_division):
      raise ValueError(f"countdown problem {problem.prompt!r} has no solution")
    if problem.solution and not check_answer(
        problem, format_solution(problem, problem.solution, problem.target)):
      raise ValueError(f"countdown problem {problem.prompt!r}: reference solution "
                       f"{list(problem.solution)} is wrong")
    return
  try:
    _needed(problem)
  except ValueError as e:
    raise ValueError(f"arithmetic problem {problem.prompt!r} has no solution") from e
  checks = check_steps(problem, problem.solution)
  if not all(c.valid for c in checks) or parse_step(problem.solution[-1])[3] != problem.target:
    raise ValueError(f"arithmetic problem {problem.prompt!r} has no solution: reference "
                     f"{list(problem.solution)} does not compute {problem.target}")


# --------------------------------------------------------------------------------------------------
# Countdown generator.


def _rng(seed: int, family: str, i: int) -> np.random.Generator:
  return np.random.default_rng([seed, FAMILIES.index(family), i])


def _random_moves(ms: Sequence[int], division: bool, rng: np.random.Generator) -> list[Move]:
  """Every legal move on the multiset ms, shuffled."""
  moves = {m for i, j in itertools.combinations(range(len(ms)), 2)
           for m in _pair_results(ms[i], ms[j], division)}
  moves = sorted(moves)
  return [moves[k] for k in rng.permutation(len(moves))]


def _apply_move(state: list[int], move: Move) -> list[int]:
  out = list(state)
  out.remove(move[0])
  out.remove(move[2])
  return sorted([*out, move[3]])


def _countdown_one(spec: CountdownSpec, rng: np.random.Generator) -> Problem:
  """Random legal moves until one number is left; the target is the in-range result whose
  derivation uses the most numbers, the reference its derivation (the moves it depends on)."""
  lo, hi = spec.target_range
  for _ in range(MAX_ATTEMPTS):
    nums = sorted(int(x) for x in rng.integers(spec.number_range[0], spec.number_range[1] + 1,
                                               spec.n_numbers))
    items = list(enumerate(nums))  # (id, value); a move's result gets id n + its index
    moves, deps = [], []  # deps[k]: the moves result k depends on, itself included
    while len(items) > 1:
      values = [v for _, v in items]
      # trivial moves (x * 1, x / 1, 2x - x) are legal in play but make poor reference steps
      legal = [m for m in _random_moves(values, spec.allow_division, rng) if m[3] not in m[::2]]
      if not legal:
        break
      a, _, b, c = legal[0]
      ia = next(i for i, v in items if v == a)
      items.remove((ia, a))
      ib = next(i for i, v in items if v == b)
      items.remove((ib, b))
      dep = {len(moves)}
      for i in (ia, ib):
        if i >= len(nums):
          dep |= deps[i - len(nums)]
      items.append((len(nums) + len(moves), c))
      moves.append(legal[0])
      deps.append(dep)
    ok = [d for d, m in zip(deps, moves) if len(d) >= spec.min_steps and lo <= m[3] <= hi]
    if not ok:
      continue
    dep = max(ok, key=len)
    target = moves[max(dep)][3]
    if shortest_steps(nums, target, spec.allow_division, spec.min_steps - 1) is not None:
      continue  # reachable in fewer than min_steps operations
    return Problem.countdown(nums, target, [format_step(moves[k]) for k in sorted(dep)],
                             spec.allow_division)
  raise ValueError(f"no countdown problem found in {MAX_ATTEMPTS} attempts for {spec}; widen "
                   f"target_range or lower min_steps")


def countdown(n: int, spec: CountdownSpec = CountdownSpec(), seed: int | None = None
              ) -> list[Problem]:
  """n solvable Countdown problems; problem i depends only on (seed, i) (seed: spec.seed if
  None), so a longer list extends a shorter one."""
  seed = spec.seed if seed is None else seed
  return [_countdown_one(spec, _rng(seed, "countdown", i)) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Word-problem generator.

_NAMES = (("Ann", "she", "her", "her"), ("Ben", "he", "his", "him"), ("Cara", "she", "her", "her"),
          ("Dan", "he", "his", "him"), ("Eva", "she", "her", "her"), ("Finn", "he", "his", "him"),
          ("Gina", "she", "her", "her"), ("Hugo", "he", "his", "him"))
_ITEMS = ("apples", "marbles", "stickers", "coins", "cards", "pencils", "shells", "stamps")


@dataclasses.dataclass
class _Ctx:
  name: str
  she: str
  her: str
  him: str
  friend: str
  items: str


def _templates(division: bool) -> list[tuple[int, Callable]]:
  """(steps, builder); builder(ctx, v, draw) -> (sentence, numbers, moves) or None if the
  numbers drawn break the rules (v: the amount so far; draw(): a number from value_range)."""
  def add(c, v, draw):
    a = draw()
    return f"{c.she.title()} buys {a} more {c.items}.", [a], [(v, "+", a, v + a)]

  def sub(c, v, draw):
    a = draw()
    if a >= v:
      return None
    return f"{c.she.title()} gives {a} {c.items} to {c.friend}.", [a], [(v, "-", a, v - a)]

  def mul(c, v, draw):
    a = draw()
    return (f"Then {c.she} has {a} times as many {c.items} as before.", [a],
            [(v, "*", a, v * a)])

  def div(c, v, draw):
    a = draw()
    if v % a:
      return None
    return (f"{c.she.title()} splits {c.her} {c.items} into {a} equal piles and keeps one pile.",
            [a], [(v, "/", a, v // a)])

  def add_groups(c, v, draw):
    a, b = draw(), draw()
    return (f"{c.she.title()} buys {a} bags with {b} {c.items} in each bag.", [a, b],
            [(a, "*", b, a * b), (v, "+", a * b, v + a * b)])

  def sub_groups(c, v, draw):
    a, b = draw(), draw()
    if a * b >= v:
      return None
    return (f"{c.she.title()} gives {c.friend} {a} boxes with {b} {c.items} in each box.", [a, b],
            [(a, "*", b, a * b), (v, "-", a * b, v - a * b)])

  def friend_times(c, v, draw):
    a = draw()
    return (f"{c.friend} has {a} times as many {c.items} as {c.name} and gives {c.him} all of "
            f"them.", [a], [(v, "*", a, v * a), (v, "+", v * a, v + v * a)])

  def friend_fewer(c, v, draw):
    a = draw()
    if a >= v:
      return None
    return (f"{c.friend} has {a} {c.items} fewer than {c.name} and gives {c.him} all of them.",
            [a], [(v, "-", a, v - a), (v, "+", v - a, 2 * v - a)])

  out = [(1, add), (1, sub), (1, mul), (2, add_groups), (2, sub_groups), (2, friend_times),
         (2, friend_fewer)]
  return out + [(1, div)] if division else out


def _arithmetic_one(spec: ArithmeticSpec, rng: np.random.Generator) -> Problem:
  templates = _templates(spec.allow_division)
  draw = lambda: int(rng.integers(spec.value_range[0], spec.value_range[1] + 1))
  for _ in range(MAX_ATTEMPTS):
    (name, she, her, him), friend = _NAMES[int(rng.integers(len(_NAMES)))], None
    while friend is None or friend == name:
      friend = _NAMES[int(rng.integers(len(_NAMES)))][0]
    ctx = _Ctx(name, she, her, him, friend, _ITEMS[int(rng.integers(len(_ITEMS)))])
    v = int(rng.integers(spec.start_range[0], spec.start_range[1] + 1))
    sentences, numbers, moves = [f"{name} has {v} {ctx.items}."], [v], []
    while len(moves) < spec.n_steps:
      fits = [t for k, t in templates if len(moves) + k <= spec.n_steps]
      built = fits[int(rng.integers(len(fits)))](ctx, v, draw)
      if built is None or any(not 1 <= m[3] <= spec.max_value for m in built[2]):
        break
      sentences.append(built[0])
      numbers += built[1]
      moves += built[2]
      v = moves[-1][3]
    if len(moves) < spec.n_steps:
      continue
    sentences.append(f"How many {ctx.items} does {name} have now?")
    return Problem("arithmetic", " ".join(sentences), tuple(numbers), v,
                   tuple(format_step(m) for m in moves), spec.allow_division)
  raise ValueError(f"no word problem found in {MAX_ATTEMPTS} attempts for {spec}; raise "
                   f"max_value or narrow value_range")


def arithmetic(n: int, spec: ArithmeticSpec = ArithmeticSpec(), seed: int | None = None
               ) -> list[Problem]:
  """n template word problems; problem i depends only on (seed, i) (seed: spec.seed if None)."""
  seed = spec.seed if seed is None else seed
  return [_arithmetic_one(spec, _rng(seed, "arithmetic", i)) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Noisy traces.


def _wrong(c: int, rng: np.random.Generator) -> int:
  """A plausible slip: c off by a small amount (never c itself, always positive)."""
  d = int(rng.choice([-10, -2, -1, 1, 2, 10]))
  return c + d if c + d >= 1 else c + abs(d)


def _countdown_trace(problem: Problem, rng: np.random.Generator, error_rate: float
                     ) -> tuple[list[str], list[bool], int]:
  div, t = problem.allow_division, problem.target
  state = sorted(problem.numbers)
  use_ref = bool(problem.solution) and rng.random() < 0.5
  plan = [parse_step(s) for s in problem.solution] if use_ref else None
  steps, errors = [], []
  while t not in state and len(state) >= 2:
    if not plan and solvable(state, t, div):  # (re)plan from where the trace stands
      plan = [parse_step(s) for s in solve(state, t, rng, div, shortest=False)]
    move = plan.pop(0) if plan else _random_moves(state, div, rng)[0]
    err = rng.random() < error_rate
    if err:
      plan = None
      dead = None
      if rng.random() < 0.5:  # a legal move after which the target is out of reach
        dead = next((m for m in _random_moves(state, div, rng)
                     if not solvable(_apply_move(state, m), t, div)), None)
      a, op, b, c = move
      move = dead if dead is not None else (a, op, b, _wrong(c, rng))
    steps.append(format_step(move))
    errors.append(err)
    state = _apply_move(state, move)
  answer = t if t in state else min(state, key=lambda x: (abs(x - t), x))
  return steps, errors, answer


def _sources(moves: list[Move], numbers: Sequence[int]) -> list[list[int | None]]:
  """For each reference step, where each operand comes from: an earlier step's index, or None
  for a number of the text (unused results first, then the text's numbers, then used results)."""
  leaves = collections.Counter(numbers)
  used: set[int] = set()
  out = []
  for k, (a, _, b, _) in enumerate(moves):
    src = []
    for x in (a, b):
      earlier = [j for j in range(k - 1, -1, -1) if moves[j][3] == x]
      fresh = [j for j in earlier if j not in used]
      if fresh:
        j = fresh[0]
      elif leaves[x] > 0:
        leaves[x] -= 1
        j = None
      else:
        j = earlier[0] if earlier else None
      if j is not None:
        used.add(j)
      src.append(j)
    out.append(src)
  return out


def _arithmetic_trace(problem: Problem, rng: np.random.Generator, error_rate: float
                      ) -> tuple[list[str], list[bool], int]:
  moves = [parse_step(s) for s in problem.solution]
  srcs, needed = _sources(moves, problem.numbers), _needed(problem)
  order, todo = [], list(range(len(moves)))
  while todo:  # a random topological order: independent steps in any order
    ready = [k for k in todo if all(j is None or j in order for j in srcs[k])]
    k = ready[int(rng.integers(len(ready)))]
    order.append(k)
    todo.remove(k)
  value: dict[int, int] = {}  # step -> the value the trace wrote for it
  steps, errors = [], []
  for k in order:
    err = rng.random() < error_rate
    while err and rng.random() < 0.5:  # a dead end: a legal detour, then the step itself
      avail = sorted({*problem.numbers, *value.values()})
      detours = [m for i, j in itertools.combinations_with_replacement(range(len(avail)), 2)
                 for m in _pair_results(avail[i], avail[j], True) if m[3] not in needed]
      if not detours:
        break
      steps.append(format_step(detours[int(rng.integers(len(detours)))]))
      errors.append(True)
      err = rng.random() < error_rate
    (a, op, b, _), (sa, sb) = moves[k], srcs[k]
    a, b = (a if sa is None else value[sa]), (b if sb is None else value[sb])
    c = apply_op(a, op, b, True)
    if c is None:  # an earlier error made the operation illegal: write it out anyway
      c = {"-": a - b, "/": a // b if b else 0}[op]
    if op in "+*" and rng.random() < 0.5:
      a, b = b, a
    value[k] = _wrong(c, rng) if err else c
    steps.append(format_step((a, op, b, value[k])))
    errors.append(err)
  return steps, errors, value[order[-1]]


def noisy_trace(problem: Problem, rng: np.random.Generator, error_rate: float = 0.0) -> Trace:
  """A solution trace with errors, labelled by the checker.

  Correct steps follow the reference (countdown: half the time; otherwise a solution sampled
  with the solver, `solve(..., shortest=False)`; arithmetic: the reference's steps in a random
  valid order, commutative operands swapped at random). Each step is an error with probability
  error_rate, half wrong arithmetic (a result off by a little, then used as written), half a
  legal dead end (countdown: a move after which the target is unreachable, wrong arithmetic if
  none exists; arithmetic: an extra detour step computing an unneeded quantity); the trace then
  continues from where it stands (countdown: re-solving when the target is still reachable from
  the numbers as written, else legal moves until one number is left, the answer then being the
  number nearest the target; arithmetic: later steps compute on the values as written).

  Args:
    problem: a generated or validated problem.
    rng: the randomness.
    error_rate: probability that a step is an error, in [0, 1].
  Returns:
    a Trace whose checks are check_steps(problem, steps).
  """
  if not 0.0 <= error_rate <= 1.0:
    raise ValueError(f"error_rate={error_rate} must be in [0, 1]")
  if problem.family == "countdown":
    steps, errors, answer = _countdown_trace(problem, rng, error_rate)
  elif problem.family == "arithmetic":
    steps, errors, answer = _arithmetic_trace(problem, rng, error_rate)
  else:
    raise ValueError(f"unknown family {problem.family!r}; expected one of {FAMILIES}")
  return Trace(tuple(steps), tuple(check_steps(problem, steps)), tuple(errors), answer)
