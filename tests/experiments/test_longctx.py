"""Long-context suite: prompt lengths under several tokenizers, where needles, chains and word
counts sit in the context, exact scorers, prompt layouts, the train/eval split and bad input."""

import collections
import re

import numpy as np
import pytest
import tokenizers

from experiments import data, longctx
from experiments.longctx import (
    AGGREGATION,
    FAMILIES,
    LOCALIZATION,
    PASSKEY_Q,
    SEP,
    Example,
    by_family,
    count_tokens,
    generate,
    grid_accuracy,
    length_tolerance,
    needle_grid,
    score,
    suite,
    train_examples,
)
from experiments.tasks import PasskeyTask, plot_grid, save_grid

NEEDLE_RE = re.compile(r"^One of the special magic numbers for (\S+) is: (\d+)\.$", re.M)
VAR_RE = re.compile(r"^VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)$", re.M)


@pytest.fixture(scope="module")
def bpe(hf_folder):
  """The byte-level BPE of the shared Hugging Face test folder."""
  folder, _, _ = hf_folder("llama")
  return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def tokenizer_of(kind: str, bpe):
  """None (UTF-8 bytes), a callable (characters), a tokenizers.Tokenizer, a data.Dataset."""
  empty = np.zeros(0, np.uint16)
  return {"bytes": None, "chars": lambda s: list(s), "bpe": bpe,
          "dataset": data.Dataset(bpe, empty, empty)}[kind]


def body_and_items(ex: Example, item_re: re.Pattern) -> tuple[str, list[tuple[int, str]]]:
  """The context without its header line, and (offset in it, text) of each item line."""
  _, body = ex.context.split("\n", 1)
  return body, [(m.start(), m.group(0)) for m in item_re.finditer(body)]


def filler_depth(ex: Example, item_re: re.Pattern, which: int, count) -> float:
  """Filler tokens before item `which` over all filler tokens, items removed (the definition
  of Example.depth)."""
  body, items = body_and_items(ex, item_re)
  pieces, prev = [], 0
  for at, text in items:
    pieces.append(body[prev:at])
    prev = at + len(text) + 1  # the item's own line end
  pieces.append(body[prev:])
  return count("".join(pieces[:which + 1])) / count("".join(pieces))


@pytest.mark.parametrize("length", [1024, 3000])
@pytest.mark.parametrize("kind", ["bytes", "chars", "bpe", "dataset"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_prompts_hit_the_target_length(name, kind, length, bpe):
  seed = 11
  print(f"seed={seed}")
  tok = tokenizer_of(kind, bpe)
  exs = generate(name, 3, length, seed=seed, tokenizer=tok)
  lengths = [e.length for e in exs]
  print(name, kind, length, lengths)
  for e in exs:
    assert e.family == name and e.target_length == length
    assert e.length == count_tokens(e.prompt(), tok)
    assert length - length_tolerance(length) <= e.length <= length
  assert len({e.context for e in exs}) == 3


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_sits_at_the_requested_depth(depth):
  seed = 5
  print(f"seed={seed}")
  for ex in longctx.needle(3, 4096, seed=seed, depth=depth):
    body, items = body_and_items(ex, NEEDLE_RE)
    assert len(items) == 1 and ex.depth == depth
    key, value = NEEDLE_RE.search(body).groups()
    assert value == ex.answer and key == ex.meta["key"] and key in ex.question
    assert ex.question.endswith("mentioned in the provided text is")
    got = filler_depth(ex, NEEDLE_RE, 0, count_tokens)
    print(depth, got, ex.meta["placed"])
    assert got == pytest.approx(ex.meta["placed"][0], abs=2e-3)
    assert abs(got - depth) <= 0.03
    # No line boundary of the filler is nearer the requested depth than the one taken.
    filler = body[:items[0][0]] + body[items[0][0] + len(items[0][1]) + 1:]
    ends = np.cumsum([0] + [len(s.encode()) for s in filler.splitlines(keepends=True)])
    total = len(filler.encode())
    assert abs(got * total - depth * total) <= np.abs(ends - depth * total).min() + 2


def test_multikey_asks_one_of_distinct_keys_at_depth():
  seed = 7
  print(f"seed={seed}")
  for ex in longctx.multikey(4, 4096, seed=seed, depth=0.3, num_keys=5):
    found = dict(NEEDLE_RE.findall(ex.context))
    assert len(found) == 5 == len(NEEDLE_RE.findall(ex.context))  # distinct keys, one needle each
    assert set(found) == set(ex.meta["keys"]) and ex.meta["key"] == ex.meta["keys"][0]
    assert ex.answer == found[ex.meta["key"]] and f"for {ex.meta['key']} mentioned" in ex.question
    assert sum(k in ex.question for k in found) == 1
    order = [k for k, _ in NEEDLE_RE.findall(ex.context)].index(ex.meta["key"])
    assert abs(filler_depth(ex, NEEDLE_RE, order, count_tokens) - 0.3) <= 0.03


def test_multivalue_hides_every_value_under_one_key():
  seed = 8
  print(f"seed={seed}")
  for ex in longctx.multivalue(4, 2048, seed=seed, num_values=3):
    needles = NEEDLE_RE.findall(ex.context)
    assert {k for k, _ in needles} == {ex.meta["key"]} and len(needles) == 3
    assert sorted(v for _, v in needles) == sorted(ex.answer) and len(set(ex.answer)) == 3
    assert ex.meta["key"] in ex.question and ex.question.endswith("text are")


@pytest.mark.parametrize("num_chains", [1, 3])
def test_vartrack_answer_is_the_variables_holding_the_value(num_chains):
  seed = 9
  print(f"seed={seed}")
  for ex in longctx.vartrack(3, 2048, seed=seed, depth=0.2, num_chains=num_chains, num_hops=3):
    value = {}
    for name, rhs in VAR_RE.findall(ex.context):  # in reading order
      value[name] = value[rhs[4:]] if rhs.startswith("VAR ") else rhs
    assert len(value) == num_chains * 4
    holding = sorted(n for n, v in value.items() if v == ex.meta["value"])
    assert holding == sorted(ex.answer) and len(ex.answer) == 4
    assert f"the value {ex.meta['value']} in the text above" in ex.question
    assert "4 variables are assigned" in ex.question
    assert abs(filler_depth(ex, VAR_RE, [n for n, _ in VAR_RE.findall(ex.context)].index(
        ex.answer[0]), count_tokens) - 0.2) <= 0.04


@pytest.mark.parametrize(("length", "k"), [(512, 3), (2048, 10), (6000, 10)])
def test_common_words_answer_is_the_k_most_common(length, k):
  seed = 3
  print(f"seed={seed}")
  for ex in longctx.common_words(3, length, seed=seed, k=k):
    _, body = ex.context.split("\n", 1)
    entries = re.findall(r"(\d+)\. (\w+)", body)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = collections.Counter(w for _, w in entries)
    assert len(ex.answer) == k and {counts[w] for w in ex.answer} == {ex.meta["common"]}
    assert max(c for w, c in counts.items() if w not in ex.answer) < ex.meta["common"]
    assert f"the {k} most common words" in ex.question


@pytest.mark.parametrize(("length", "k"), [(512, 3), (2048, 3), (4096, 5)])
def test_frequent_words_answer_is_the_k_most_frequent(length, k):
  seed = 4
  print(f"seed={seed}")
  for ex in longctx.frequent_words(3, length, seed=seed, k=k):
    _, body = ex.context.split("\n", 1)
    counts = collections.Counter(body.split())
    top = counts.most_common()
    assert {w for w, _ in top[:k]} == set(ex.answer)
    assert top[k - 1][1] > top[k][1]  # a strict gap: the answer is unique
    assert [c for _, c in top[:k + 1]] == ex.meta["counts"]


def test_passkey_uses_the_wording_of_tasks_py():
  seed = 2
  print(f"seed={seed}")
  text = PasskeyTask.from_tokenizer(lambda s: [s], ())
  assert "".join(text.query).strip() == PASSKEY_Q == "What is the pass key? The pass key is"
  for ex in longctx.passkey(3, 1024, seed=seed, depth=0.6):
    assert len(ex.answer) == text.value_digits and ex.answer.isdigit()
    assert ex.context.count(f"The pass key is {ex.answer}. Remember it.") == 1
    assert ex.question == PASSKEY_Q


@pytest.mark.parametrize(("generated", "expected"), [
    ("1234567", 1.0), (" 1234567.", 1.0), ("\n  1234567 \n\n more text", 1.0),
    ('"1234567"', 1.0), ("1234567, and 99", 1.0), ("12345678", 0.0), ("1234568", 0.0),
    ("The number is 1234567", 0.0), ("123 4567", 0.0), ("", 0.0)])
def test_single_answer_scorer_is_exact(generated, expected):
  ex = Example("needle", "ctx", "q", "1234567", 3, 0.5, 64, (1, 0, 0, 64, 0))
  assert score(ex, generated) == expected


@pytest.mark.parametrize(("generated", "expected"), [
    ("alpha beta gamma delta", 1.0), ("  Alpha,\n\tBETA  ", 0.5), ("delta delta delta", 0.25),
    ("alphabet betas gammas", 0.0), ("wrong", 0.0), ("", 0.0),
    ("they are: gamma, alpha and\n\n   delta and beta", 1.0), ("alpha_beta gamma", 0.25)])
def test_multi_answer_scorer_counts_answers_found(generated, expected):
  ex = Example("multivalue", "ctx", "q", ["alpha", "beta", "gamma", "delta"], 3, 0.5, 64,
               (1, 0, 0, 64, 0))
  assert score(ex, generated) == expected


def test_scores_of_generated_examples_and_summary():
  seed = 12
  print(f"seed={seed}")
  exs = suite([1024], 2, seed=seed)
  right = [score(e, "  " + ", ".join(e.answers) + ".\nMore text.") for e in exs]
  wrong = [score(e, "I do not know.") for e in exs]
  assert right == [1.0] * len(exs) and wrong == [0.0] * len(exs)
  half = [score(e, e.answers[0]) for e in exs]
  assert all(h == 1 / len(e.answers) for h, e in zip(half, exs))
  summary = by_family(exs, half)
  assert summary["needle"] == 1.0 and summary["common_words"] == pytest.approx(0.1)
  assert summary["all"] == pytest.approx(np.mean(half))
  assert set(summary) == set(FAMILIES) | {"localization", "aggregation", "all"}


def test_query_aware_and_agnostic_layouts(bpe):
  seed = 13
  print(f"seed={seed}")
  for ex in suite([1024], 1, seed=seed, tokenizer=bpe):
    assert ex.prompt(query_aware=True) == ex.context + SEP + ex.question
    assert ex.prompt(query_aware=False) == ex.context
    context, query = ex.parts()
    assert context == ex.context and context + query == ex.prompt()
    assert ex.question not in ex.context
    # The question is the prompt's last tokens: an observation window of its size (and a token
    # for a merge across the boundary) holds it, and no more of the context than that.
    window = count_tokens(query, bpe) + 1
    ids = bpe.encode(ex.prompt(), add_special_tokens=False).ids
    tail = bpe.decode(ids[-window:])
    assert len(ids) == ex.length and tail.endswith(ex.question) and len(tail) <= len(query) + 8


def test_train_and_eval_examples_are_disjoint(corpus):
  seed = 1
  print(f"seed={seed}")
  evals = suite([1024, 2048], 2, seed=seed) + needle_grid([1024], [0.0, 1.0], 2, seed)
  train = train_examples(40, [1024, 2048], seed=seed)
  assert {e.seed[0] for e in evals} == {data.SPLITS.index("val")}
  assert {e.seed[0] for e in train} == {data.SPLITS.index("train")}
  assert not {e.seed for e in evals} & {e.seed for e in train}
  assert not {e.context for e in evals} & {e.context for e in train}
  # Cells taken in turn: every prefix of len(families) * len(lengths) is balanced.
  cells = [(e.family, e.target_length) for e in train[:14]]
  assert sorted(cells) == sorted((f, n) for f in FAMILIES for n in (1024, 2048))
  # 40 over 14 cells: the first 12 cells (all of length 1024, then 5 of 2048) get 3, the rest 2.
  assert collections.Counter(e.family for e in train) == {f: 6 if f in LOCALIZATION else 5
                                                          for f in FAMILIES}
  # The filler of each side comes from its own files of the corpus.
  val_fraction = data.DataConfig().val_fraction
  docs = data._split_docs(data._read_docs(str(corpus), None), val_fraction, str(corpus))
  lines = {s: {line for d in docs[s] for line in d.text.split("\n")} for s in data.SPLITS}
  for split in data.SPLITS:
    ex = longctx.needle(1, 2048, seed=seed, source=str(corpus), split=split, depth=0.5)[0]
    filler = [line for line in ex.context.split("\n")[1:-1] if not NEEDLE_RE.match(line)]
    assert filler and all(line in lines[split] for line in filler)


def test_generation_is_deterministic_and_independent_of_n():
  seed = 6
  print(f"seed={seed}")
  for name in FAMILIES:
    a, b = generate(name, 2, 1024, seed=seed), generate(name, 3, 1024, seed=seed)
    assert a == b[:2]
    assert generate(name, 1, 1024, seed=seed + 1)[0].context != a[0].context


def test_needle_grid_and_grid_accuracy(tmp_path):
  seed = 10
  print(f"seed={seed}")
  exs = needle_grid([1024, 2048], [0.0, 0.5, 1.0], 2, seed)
  assert len(exs) == 12 and {e.family for e in exs} == {"needle"}
  by_cell = collections.defaultdict(list)
  for e in exs:
    by_cell[e.target_length].append((e.depth, e.answer, e.meta["key"]))
  for cell in by_cell.values():  # the same needles at every depth of a length
    assert len({(a, k) for _, a, k in cell}) == 2
  grid = grid_accuracy(exs, [float(e.depth < 0.75) for e in exs])
  assert grid["lengths"] == [1024, 2048] and grid["depths"] == [0.0, 0.5, 1.0]
  assert grid["accuracy"] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]] and grid["samples"] == 2
  save_grid(grid, tmp_path / "grid.json")
  assert plot_grid(grid, tmp_path / "grid.png").stat().st_size > 1000


def test_families_and_kinds():
  assert set(FAMILIES) == LOCALIZATION | AGGREGATION and not LOCALIZATION & AGGREGATION
  assert AGGREGATION == {"common_words", "frequent_words"}


def test_families_on_a_folder_corpus(corpus):
  seed = 14
  print(f"seed={seed}")
  for name in ("needle", "multikey", "passkey", "vartrack", "multivalue"):
    for e in generate(name, 2, 1500, seed=seed, source=str(corpus)):
      assert 1500 - length_tolerance(1500) <= e.length <= 1500


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: generate("haystack", 1, 1024, seed=0), ValueError, "unknown task family 'haystack'"),
    (lambda: suite([1024], 1, 0, families=["needle", "nope"]), ValueError, "'nope'"),
    (lambda: longctx.needle(1, 63, seed=0), ValueError, "length=63 must be"),
    (lambda: longctx.common_words(1, 32, seed=0), ValueError, "length=32 must be"),
    (lambda: longctx.needle(1, 100, seed=0), ValueError, "length=100 is too short for needle"),
    (lambda: longctx.needle(1, 1024, seed=0, depth=1.5), ValueError, r"depth=1\.5 is outside"),
    (lambda: longctx.vartrack(1, 1024, seed=0, depth=-0.1), ValueError, r"depth=-0\.1 is out"),
    (lambda: longctx.common_words(1, 1024, seed=0, depth=0.5), ValueError, "no meaning"),
    (lambda: longctx.needle(1, 1024, seed=-1), ValueError, "seed=-1"),
    (lambda: longctx.needle(1, 1024, seed=0, split="test"), ValueError, "split='test'"),
    (lambda: longctx.needle(1, 1024, seed=0, tokenizer=42), TypeError, "tokenizer must be"),
    (lambda: longctx.common_words(1, 1024, seed=0, common_freq=3), ValueError, "common_freq=3"),
])
def test_bad_input_raises_one_line_errors(call, error, match):
  with pytest.raises(error, match=match) as info:
    call()
  assert "\n" not in str(info.value)


def test_too_few_corpus_words_is_an_error(corpus):
  with pytest.raises(ValueError, match="distinct words") as info:
    longctx.common_words(1, 4096, seed=0, source=str(corpus))
  assert "\n" not in str(info.value)


def test_needle_depth_range_bounds_random_depths():
  seed = 11
  print(f"seed={seed}")
  exs = longctx.needle(12, 512, seed=seed, depth_range=(0.4, 0.6))
  assert all(0.4 <= e.depth <= 0.6 for e in exs) and len({e.depth for e in exs}) == 12
  # The default range draws the same uniform number: the depths map affinely.
  full = longctx.needle(12, 512, seed=seed)
  assert np.allclose([0.4 + 0.2 * e.depth for e in full], [e.depth for e in exs])
  with pytest.raises(ValueError, match="depth_range"):
    longctx.needle(1, 512, seed=seed, depth_range=(0.7, 0.3))
