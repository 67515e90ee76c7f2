"""Reasoning tasks: generated problems are solvable and their references pass the checkers, the
exact solver against brute force, hand-made checker cases, noisy traces (error rate, labels),
the step token under byte-level BPE, determinism and bad input."""

import collections
import functools
import inspect
import itertools
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from experiments import reasoning
from experiments.reasoning import (
    ANSWER,
    STEP,
    ArithmeticSpec,
    CountdownSpec,
    Problem,
    StepCheck,
    apply_op,
    arithmetic,
    check_answer,
    check_steps,
    countdown,
    format_solution,
    noisy_trace,
    parse_solution,
    parse_step,
    shortest_steps,
    solvable,
    solve,
    step_token_id,
    validate,
)

COUNTDOWN_SPECS = [
    CountdownSpec(n_numbers=2, number_range=(1, 12), target_range=(2, 150), min_steps=1),
    CountdownSpec(n_numbers=3, allow_division=False),
    CountdownSpec(n_numbers=4),
    CountdownSpec(n_numbers=5, target_range=(50, 500), min_steps=3),
    CountdownSpec(n_numbers=6, number_range=(1, 50), target_range=(100, 999)),
]
ARITHMETIC_SPECS = [ArithmeticSpec(n_steps=k) for k in (1, 2, 4, 6)] + [
    ArithmeticSpec(n_steps=5, allow_division=False, value_range=(2, 9), max_value=200)]

T = StepCheck(True, True)


@functools.lru_cache(None)
def brute_reach(ms: tuple[int, ...], division: bool) -> frozenset[int]:
  """Every value a sequence of steps can put in the multiset (the numbers given included)."""
  out = set(ms)
  for i, j in itertools.combinations(range(len(ms)), 2):
    rest = ms[:i] + ms[i + 1:j] + ms[j + 1:]
    for x, y in ((ms[i], ms[j]), (ms[j], ms[i])):
      for op in "+-*/":
        c = apply_op(x, op, y, division)
        if c is not None:
          out |= brute_reach(tuple(sorted((*rest, c))), division)
  return frozenset(out)


# ------------------------------------------------------------------------------------------------
# Generators.


@pytest.mark.parametrize("spec", COUNTDOWN_SPECS, ids=lambda s: f"n{s.n_numbers}")
def test_countdown_problems_are_solvable_and_references_pass(spec):
  seed = 11
  print("seed", seed)
  probs = countdown(40, spec, seed)
  assert len(probs) == 40
  for p in probs:
    validate(p)
    assert p.family == "countdown" and len(p.numbers) == spec.n_numbers
    assert p.prompt == f"numbers: {' '.join(map(str, p.numbers))} | target: {p.target}"
    assert p.prompt.isascii() and STEP not in p.prompt
    assert all(spec.number_range[0] <= x <= spec.number_range[1] for x in p.numbers)
    assert spec.target_range[0] <= p.target <= spec.target_range[1]
    assert solvable(p.numbers, p.target, spec.allow_division)
    k = shortest_steps(p.numbers, p.target, spec.allow_division)
    assert spec.min_steps <= k <= len(p.solution) <= spec.n_numbers - 1
    assert check_steps(p, p.solution) == [T] * len(p.solution)
    assert check_answer(p, format_solution(p, p.solution, p.target))
    moves = [parse_step(s) for s in p.solution]
    assert moves[-1][3] == p.target
    assert all(m[3] > 0 for m in moves)
    if not spec.allow_division:
      assert all(m[1] != "/" for m in moves)


@pytest.mark.parametrize("spec", ARITHMETIC_SPECS, ids=lambda s: f"k{s.n_steps}")
def test_word_problems_have_exact_answers_and_references_pass(spec):
  seed = 5
  print("seed", seed)
  for p in arithmetic(40, spec, seed):
    validate(p)
    assert p.family == "arithmetic" and p.prompt.isascii() and STEP not in p.prompt
    assert p.prompt.endswith("have now?")
    assert [int(w.strip(".")) for w in p.prompt.split() if w.strip(".").isdigit()] == \
        list(p.numbers)
    assert len(p.solution) == spec.n_steps
    moves = [parse_step(s) for s in p.solution]
    assert all(1 <= m[3] <= spec.max_value for m in moves) and moves[-1][3] == p.target
    if not spec.allow_division:
      assert all(m[1] != "/" for m in moves)
    assert check_steps(p, p.solution) == [T] * spec.n_steps
    assert check_answer(p, format_solution(p, p.solution, p.target))
    assert not check_answer(p, format_solution(p, p.solution, p.target + 1))


def test_generators_are_deterministic_by_seed_and_prefix_stable():
  spec = CountdownSpec(n_numbers=5, seed=3)
  a = countdown(12, spec)
  assert a == countdown(12, spec, seed=3) and a[:5] == countdown(5, spec)
  assert a != countdown(12, spec, seed=4)
  w = arithmetic(12, ArithmeticSpec(seed=2))
  assert w == arithmetic(12, ArithmeticSpec(), seed=2) and w != arithmetic(12, ArithmeticSpec())
  p = a[0]
  t1 = noisy_trace(p, np.random.default_rng(9), 0.4)
  assert t1 == noisy_trace(p, np.random.default_rng(9), 0.4)


# ------------------------------------------------------------------------------------------------
# The exact solver.


def test_solver_matches_brute_force():
  seed = 17
  print("seed", seed)
  rng = np.random.default_rng(seed)
  for _ in range(60):
    n = int(rng.integers(2, 5))
    ms = tuple(sorted(int(x) for x in rng.integers(1, 30, n)))
    div = bool(rng.integers(2))
    reach = brute_reach(ms, div)
    for t in [*rng.integers(1, 400, 8).tolist(), *rng.choice(sorted(reach), 4).tolist()]:
      assert solvable(ms, t, div) == (t in reach), (ms, t, div)
      sol = solve(ms, t, rng, div)
      if t in reach:
        p = Problem.countdown(ms, t, sol, div)
        assert len(sol) == shortest_steps(ms, t, div)
        assert all(c.valid for c in check_steps(p, sol))
        assert sol == [] or check_answer(p, format_solution(p, sol, t))
      else:
        assert sol is None and shortest_steps(ms, t, div) is None


def test_solver_cases_and_six_numbers_fast():
  assert not solvable([3, 7, 25, 50], 311) and solve([3, 7, 25, 50], 311) is None
  assert solvable([1, 2], 3) and not solvable([1, 2], 4) and solvable([1, 2], 2)
  assert solvable([6, 3], 2) and not solvable([6, 3], 2, allow_division=False)
  assert not solvable([5, 5], 0)  # no zero (or negative) intermediates
  assert shortest_steps([2, 3, 4], 20) == 2 and shortest_steps([2, 3, 4], 9) == 2
  assert shortest_steps([2, 3, 4], 4) == 0 and shortest_steps([2, 3, 4], 7) == 1
  assert solve([25, 50, 75, 100, 3, 6], 952) is not None  # the famous 1972 game
  reasoning._values.cache_clear()
  assert not solvable([1, 3, 7, 10, 25, 50], 10 ** 9 + 7)  # a full search of six numbers


# ------------------------------------------------------------------------------------------------
# Checkers on hand-made cases.


def test_countdown_checker_cases():
  p = Problem.countdown([3, 7, 25, 50], 225)  # (50 + 25) * 3
  validate(p)
  assert check_steps(p, ["50 + 25 = 75", "75 * 3 = 225"]) == [T, T]
  assert check_steps(p, ["7 + 3 = 10", "10 - 1 = 9"]) == [StepCheck(True, False),
                                                          StepCheck(False, False)]  # no 1
  assert check_steps(p, ["50 - 25 = 26"]) == [StepCheck(False, False)]  # wrong arithmetic
  assert check_steps(p, ["50 / 3 = 16"]) == [StepCheck(False, False)]  # inexact division
  assert check_steps(p, ["3 - 7 = -4"]) == [StepCheck(False, False)]  # negative
  assert check_steps(p, ["3 - 3 = 0"]) == [StepCheck(False, False)]  # there is one 3 only
  assert check_steps(p, ["fifty minus 25"]) == [StepCheck(False, False)]  # does not parse
  # a valid move that is a dead end, and the valid moves after it
  assert not solvable([3, 7, 1250], 225)
  assert check_steps(p, ["50 * 25 = 1250", "1250 + 7 = 1257"]) == [StepCheck(True, False)] * 2
  # once wrong, later right steps stay off track (the prefix is broken)
  assert check_steps(p, ["50 + 25 = 76", "76 * 3 = 228"]) == [StepCheck(False, False),
                                                            StepCheck(True, False)]
  # a consumed number: the first step uses up the 3
  q = Problem.countdown([2, 3, 5], 25)
  assert check_steps(q, ["2 + 3 = 5", "5 * 5 = 25"]) == [T, T]  # the new 5 and the given one
  assert check_steps(q, ["3 + 2 = 5", "5 * 3 = 15"]) == [T, StepCheck(False, False)]
  assert check_steps(q, ["5 * 5 = 25"]) == [StepCheck(False, False)]  # one 5 at the start
  assert check_steps(q, ["2 + 3 = 5", "5 * 5 = 25", "25 - 2 = 23"])[2] == StepCheck(False, False)


def test_countdown_answer_cases():
  p = Problem.countdown([3, 7, 25, 50], 225)
  steps = ["50 + 25 = 75", "75 * 3 = 225"]
  assert check_answer(p, format_solution(p, steps, 225))
  assert check_answer(p, "  50 + 25 = 75\n\n75 * 3 = 225\nso the answer: 225 (done).\nanswer: 9\n")
  assert check_answer(p, p.prompt + "\n50+25=75\n75*3=225\nanswer:225")
  assert not check_answer(p, format_solution(p, steps, 224))  # wrong answer
  assert not check_answer(p, format_solution(p, [], 225))  # the target alone is not a proof
  assert not check_answer(p, format_solution(p, steps[:1], 225))  # never reached
  assert not check_answer(p, format_solution(p, ["50 + 25 = 75", "75 * 3 = 226"], 225))
  assert not check_answer(p, "50 + 25 = 75\nhmm\n75 * 3 = 225\nanswer: 225")  # junk step
  assert not check_answer(p, "50 + 25 = 75\n75 * 3 = 225\n")  # no answer line
  assert parse_solution(p, "a\n\nb\nanswer: 7 x\nc") == (["a", "b"], 7)


def word_problem() -> Problem:
  """Ann has 12 apples; buys 3 bags of 4; gives 5 away: 12 + 3 * 4 - 5 = 19."""
  return Problem("arithmetic", "Ann has 12 apples. She buys 3 bags with 4 apples in each bag. "
                 "She gives 5 apples to Bob. How many apples does Ann have now?", (12, 3, 4, 5), 19,
                 ("3 * 4 = 12", "12 + 12 = 24", "24 - 5 = 19"))


def test_arithmetic_checker_and_answer_cases():
  p = word_problem()
  validate(p)
  assert check_steps(p, ["4 * 3 = 12", "12 + 12 = 24", "24 - 5 = 19"]) == [T, T, T]
  assert check_steps(p, ["3 * 4 = 13"]) == [StepCheck(False, False)]  # wrong arithmetic
  assert check_steps(p, ["24 - 5 = 19"]) == [StepCheck(False, False)]  # 24 not computed yet
  assert check_steps(p, ["7 * 4 = 28"]) == [StepCheck(False, False)]  # 7 is not in the text
  # a legal detour, then back on track (nothing is consumed, reuse is allowed)
  assert check_steps(p, ["12 + 5 = 17", "3 * 4 = 12", "12 + 12 = 24", "24 - 5 = 19"]) == [
      StepCheck(True, False), T, T, T]
  # an error breaks the prefix: later steps are valid on what was written but not on track
  assert check_steps(p, ["3 * 4 = 13", "12 + 13 = 25", "25 - 5 = 20"]) == [
      StepCheck(False, False), StepCheck(True, False), StepCheck(True, False)]
  text = format_solution(p, p.solution, 19)
  assert text == p.prompt + "\n3 * 4 = 12\n12 + 12 = 24\n24 - 5 = 19\nanswer: 19\n"
  assert check_answer(p, text)
  assert check_answer(p, "I think... the answer: 19 apples!\nanswer: 3")  # the first answer
  assert check_answer(p, "answer:19")
  assert not check_answer(p, "answer: 190") and not check_answer(p, "answer: 18")
  assert not check_answer(p, "19") and not check_answer(p, "")


def test_validate_catches_unsolvable_and_broken_problems():
  with pytest.raises(ValueError, match="has no solution"):
    validate(Problem.countdown([2, 3], 7))
  with pytest.raises(ValueError, match="has no solution"):
    validate(Problem.countdown([6, 3], 2, allow_division=False))
  with pytest.raises(ValueError, match="reference solution"):
    validate(Problem.countdown([2, 3], 5, ["2 * 3 = 5"]))
  p = word_problem()
  with pytest.raises(ValueError, match="has no solution"):
    validate(Problem(p.family, p.prompt, p.numbers, 20, p.solution))
  with pytest.raises(ValueError, match="has no solution"):
    validate(Problem(p.family, p.prompt, p.numbers, 19, ()))
  with pytest.raises(ValueError, match="has no solution"):
    validate(Problem(p.family, p.prompt, p.numbers, 19, ("3 * 4 = 12", "12 + 12 = 25")))
  with pytest.raises(ValueError, match="unknown family"):
    validate(Problem("sudoku", "x", (1,), 1))
  with pytest.raises(ValueError, match="must not contain"):
    validate(Problem("countdown", "a\nb", (2, 3), 5))


# ------------------------------------------------------------------------------------------------
# Noisy traces.


@pytest.mark.parametrize("family", ["countdown", "arithmetic"])
@pytest.mark.parametrize("error_rate", [0.0, 0.15, 0.4])
def test_noisy_traces_error_rate_and_labels(family, error_rate):
  seed = 23
  print("seed", seed)
  rng = np.random.default_rng(seed)
  probs = (countdown(60, CountdownSpec(n_numbers=5), seed) if family == "countdown" else
           arithmetic(60, ArithmeticSpec(n_steps=4), seed))
  errors, kinds = [], collections.Counter()
  for p in probs:
    for _ in range(5):
      tr = noisy_trace(p, rng, error_rate)
      assert len(tr.steps) == len(tr.checks) == len(tr.errors) > 0
      assert list(tr.checks) == check_steps(p, tr.steps)
      errors += tr.errors
      text = format_solution(p, tr.steps, tr.answer)
      assert parse_solution(p, text) == (list(tr.steps), tr.answer)
      if not any(tr.errors):  # an error-free trace is a correct solution
        assert all(c == T for c in tr.checks) and check_answer(p, text)
        continue
      first = tr.errors.index(True)
      assert all(c == T for c in tr.checks[:first])
      assert not tr.checks[first].reachable  # an error is never labelled on track
      kinds["wrong" if not tr.checks[first].valid else "dead"] += 1
      if family == "countdown":  # nothing recovers after an error
        assert not any(c.reachable for c in tr.checks[first:])
        assert not check_answer(p, text)
  rate = float(np.mean(errors))
  n = len(errors)
  assert abs(rate - error_rate) <= 4 * np.sqrt(error_rate * (1 - error_rate) / n) + 0.01, rate
  if error_rate:
    assert kinds["wrong"] > 0 and kinds["dead"] > 0, kinds


def test_noisy_trace_solutions_vary():
  print("seeds", 2, 0, 1)
  p = countdown(1, CountdownSpec(n_numbers=6, number_range=(1, 50), target_range=(100, 999)),
                seed=2)[0]
  rng = np.random.default_rng(0)
  sols = {noisy_trace(p, rng).steps for _ in range(30)}
  assert len(sols) > 2
  w = arithmetic(1, ArithmeticSpec(n_steps=6), seed=1)[0]
  assert len({noisy_trace(w, rng).steps for _ in range(30)}) > 2


# ------------------------------------------------------------------------------------------------
# The step token under byte-level BPE, bad input.


def test_step_is_one_token_of_a_corpus_bpe():
  """A byte-level BPE built like experiments.data's (ByteLevel pre-tokenizer and alphabet),
  trained on standard library source and traces: STEP is one id that marks every line end."""
  print("seed", 0)
  probs = countdown(30, CountdownSpec(n_numbers=4), 0) + arithmetic(30, ArithmeticSpec(), 0)
  texts = [format_solution(p, p.solution, p.target) for p in probs]
  corpus = [inspect.getsource(m) for m in (collections, inspect, json.decoder)] + texts * 5
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  encode = lambda s: tok.encode(s, add_special_tokens=False).ids
  sid = step_token_id(encode)
  for p, text in zip(probs, texts):
    ids = encode(text)
    assert ids.count(sid) == text.count(STEP) == len(p.solution) + 2 and ids[-1] == sid
    lines, cur = [], []
    for i in ids:
      if i == sid:
        lines.append(tok.decode(cur))
        cur = []
      else:
        cur.append(i)
    assert lines == [p.prompt, *p.solution, f"{ANSWER} {p.target}"]
  with pytest.raises(ValueError, match="not one"):
    step_token_id(lambda s: [1, 2])


@pytest.mark.parametrize("kwargs, match", [
    ({"n_numbers": 1}, "n_numbers=1"),
    ({"n_numbers": 7}, "n_numbers=7"),
    ({"number_range": (5, 4)}, "number_range"),
    ({"number_range": (0, 4)}, "number_range"),
    ({"target_range": (10, 9)}, "target_range"),
    ({"n_numbers": 3, "min_steps": 3}, "min_steps"),
    ({"min_steps": 0}, "min_steps"),
])
def test_bad_countdown_spec_raises_one_line(kwargs, match):
  with pytest.raises(ValueError, match=match) as e:
    CountdownSpec(**kwargs)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_steps": 0}, "n_steps"),
    ({"n_steps": 9}, "n_steps"),
    ({"value_range": (1, 5)}, "value_range"),
    ({"start_range": (9, 3)}, "start_range"),
    ({"max_value": 10}, "max_value"),
])
def test_bad_arithmetic_spec_raises_one_line(kwargs, match):
  with pytest.raises(ValueError, match=match) as e:
    ArithmeticSpec(**kwargs)
  assert "\n" not in str(e.value)


def test_unsatisfiable_spec_and_bad_arguments_raise():
  spec = CountdownSpec(n_numbers=3, number_range=(1, 1), target_range=(50, 60))
  with pytest.raises(ValueError, match="no countdown problem") as e:
    countdown(1, spec)
  assert "\n" not in str(e.value)
  p = word_problem()
  with pytest.raises(ValueError, match="error_rate"):
    noisy_trace(p, np.random.default_rng(0), 1.5)
  with pytest.raises(ValueError, match="positive"):
    solvable([3, 0], 3)
  with pytest.raises(ValueError, match="unknown family"):
    check_steps(Problem("sudoku", "x", (1,), 1), [])
