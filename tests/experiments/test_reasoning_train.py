"""The reasoning policy / PRM training run: token rows weight exactly the solution, PRM labels
sit on the step ends, AUC, config overrides, one-line errors for bad flags, and the quick run
end to end (models load back and reproduce their recorded outputs)."""

import json

import numpy as np
import pytest

from experiments import reasoning as R
from experiments.data import _train_tokenizer, eot_token_id
from experiments.reasoning_train import (
  ReasoningConfig,
  apply_overrides,
  encode_item,
  held_out_problems,
  load_reasoning,
  main,
  make_traces,
  policy_rows,
  prm_rows,
  reference_outputs,
  roc_auc,
  rollout_labels,
  solution_text,
)

METRIC_KEYS = ("policy_accuracy", "prm_step_accuracy", "prm_step_auc", "prm_answer_accuracy",
               "prm_outcome_auc")


@pytest.fixture(scope="module")
def items():
  probs = R.countdown(40, R.CountdownSpec(n_numbers=3, number_range=(1, 10),
                                          target_range=(5, 60)), seed=2)
  return make_traces(probs, 40, 0.3, seed=2, stream=2)


@pytest.fixture(scope="module")
def tok(items):
  return _train_tokenizer([solution_text(x) for x in items] * 3, 320)


def test_encoded_labels_sit_on_the_step_ends(items, tok):
  print("seed", 2)
  step = R.step_token_id(lambda s: tok.encode(s, add_special_tokens=False).ids)
  eot = eot_token_id(tok)
  for problem, trace in items:
    e = encode_item(tok, (problem, trace), step, eot)
    assert len(e.ends) == len(trace.steps) + 2 and e.ids[-1] == eot
    assert (e.ids[e.ends[:-1]] == step).all() and e.ends[-1] == len(e.ids) - 1
    ok = R.check_answer(problem, solution_text((problem, trace)))
    assert e.labels.tolist() == [float(c.reachable) for c in trace.checks] + [float(ok)] * 2
    assert tok.decode(e.ids[:e.prompt_len].tolist()) == problem.prompt + R.STEP


def test_policy_rows_weight_exactly_the_solution(items, tok):
  step = R.step_token_id(lambda s: tok.encode(s, add_special_tokens=False).ids)
  eot = eot_token_id(tok)
  encs = [encode_item(tok, x, step, eot) for x in items[:5]]
  n = max(len(e.ids) for e in encs) + 3
  toks, w = policy_rows(encs, n, pad_id=1)
  assert toks.shape == (5, n) and w.shape == (5, n - 1)
  for i, (problem, trace) in enumerate(items[:5]):
    picked = toks[i, 1:][w[i] > 0].tolist()  # the tokens the weighted positions predict
    assert picked[-1] == eot
    text = R.format_solution(problem, trace.steps, trace.answer)
    assert tok.decode(picked[:-1]) == text[len(problem.prompt) + 1:]
  t2, mask, lab = prm_rows(encs, n, pad_id=1)
  assert (t2 == toks).all() and mask.sum() == sum(len(e.ends) for e in encs)
  assert lab[mask].tolist() == np.concatenate([e.labels for e in encs]).tolist()


def test_rollout_labels_mark_prefixes_a_continuation_completes(items, tok, monkeypatch):
  """A stand-in policy that always answers the target at once: a step's estimate is 1 exactly
  when the steps so far are a correct solution; prefixes too long for the context get NaN."""
  import types

  import kvcache.decode
  from colm.config import ModelConfig
  step = R.step_token_id(lambda s: tok.encode(s, add_special_tokens=False).ids)
  eot = eot_token_id(tok)
  encs = [encode_item(tok, x, step, eot) for x in items[:12]]
  calls = []

  def fake_generate(model, prompts, *, max_new_tokens, stop_tokens, sampling, seed):
    calls.append((len(prompts), max_new_tokens, sampling.temperature))
    targets = [tok.decode(p).split("target: ")[1].split(R.STEP)[0] for p in prompts]
    return [tok.encode(f"{R.ANSWER} {t}{R.STEP}", add_special_tokens=False).ids + [eot]
            for t in targets]

  monkeypatch.setattr(kvcache.decode, "generate", fake_generate)
  longest = max(e.ends[-3] + 1 for e in encs)  # the longest prefix: through the last step
  policy = types.SimpleNamespace(cfg=ModelConfig.tiny(max_seq_len=longest + 8))
  got = rollout_labels(policy, tok, items[:12], encs, k=2, max_new_tokens=16, seed=0)
  assert calls and all(t == 1.0 and m <= 16 for _, m, t in calls)
  assert sum(n for n, _, _ in calls) == 2 * sum(len(tr.steps) for _, tr in items[:12])
  for (problem, trace), h in zip(items[:12], got):
    want = [R.check_answer(problem, "".join(s + R.STEP for s in trace.steps[:j + 1])
                           + f"{R.ANSWER} {problem.target}") for j in range(len(trace.steps))]
    assert h.tolist() == [float(w) for w in want]
  assert 0 < np.concatenate(got).mean() < 1  # both outcomes occur
  short = types.SimpleNamespace(cfg=ModelConfig.tiny(max_seq_len=4))  # no room anywhere
  assert all(np.isnan(h).all() for h in rollout_labels(short, tok, items[:3], encs[:3], 2, 16, 0))


@pytest.mark.parametrize("scores, labels, want", [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
    ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
    ([0.5, 0.5, 0.5], [0, 1, 1], 0.5),
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
    ([0.3, 0.6], [1, 1], None),
])
def test_roc_auc(scores, labels, want):
  assert roc_auc(scores, labels) == want


def test_overrides():
  cfg = apply_overrides(ReasoningConfig.quick(), ["model.d_model=96", "rollouts=2",
                                                  "countdown.number_range=[1, 12]", "lr=1"])
  assert cfg.model.d_model == 96 and cfg.rollouts == 2 and cfg.lr == 1.0
  assert cfg.countdown.number_range == (1, 12)
  for bad, msg in (["nope=1", "unknown config key 'nope'"],
                   ["model.nope=1", "unknown config key 'model.nope'"],
                   ["rollouts=two", "rollouts: expected int"], ["model=1", "unknown config"],
                   ["lr", "not key=value"]):
    with pytest.raises(ValueError, match=msg):
      apply_overrides(ReasoningConfig.quick(), [bad])


@pytest.mark.parametrize("argv, msg", [
    (["--family", "chess"], "unknown family 'chess'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--max-minutes", "-1"], "--max-minutes must be > 0"),
    (["policy_error_rate=2.0"], "policy_error_rate must be in [0, 1]"),
    (["batch=3"], "unknown config key 'batch'"),
])
def test_bad_flags_are_one_line_errors(tmp_path, argv, msg):
  with pytest.raises(SystemExit) as e:
    main(["--quick", "--out", str(tmp_path), *argv])
  text = str(e.value)
  assert msg in text and "\n" not in text and text.startswith("reasoning_train: ")
  assert not any(tmp_path.iterdir())  # nothing started


def test_quick_run_end_to_end(tmp_path):
  seed = 0
  print("seed", seed)
  out = tmp_path / "run"
  rec = main(["--quick", "--steps", "20", "--out", str(out), f"seed={seed}",
              "eval_problems=16", "eval_traces=48", "policy_traces=800", "prm_traces=400"])
  metrics = json.loads((out / "metrics.json").read_text())
  for k in METRIC_KEYS:
    assert k in metrics and k in rec
  assert 0.0 <= metrics["policy_accuracy"] <= 1.0 and 0.0 <= metrics["prm_step_accuracy"] <= 1.0
  assert metrics["policy_steps"] == 20 and metrics["prm_steps"] == 20
  res = json.loads((out / "reasoning_train_cpu.json").read_text())
  assert [c["step"] for c in res["policy_curve"]] == list(range(1, 21))
  assert len(res["prm_curve"]) == 20 and "environment" in res
  for sub in ("policy", "prm"):
    assert (out / sub / "model-00000.safetensors").is_file()
    assert (out / sub / "tokenizer.json").is_file()

  policy, prm, tok, info = load_reasoning(out)
  assert info["policy_accuracy"] == metrics["policy_accuracy"]
  step = R.step_token_id(lambda s: tok.encode(s, add_special_tokens=False).ids)
  assert prm.step_token == info["step_token"] == step
  cfg = ReasoningConfig.quick(seed=seed, eval_problems=16)
  held = held_out_problems(cfg, cfg.problems(cfg.train_problems, seed))[:len(metrics["samples"])]
  assert [p.prompt for p in held] == [s["prompt"] for s in metrics["samples"]]
  again = reference_outputs(policy, prm, tok, held, info["gen_tokens"])
  assert [s["text"] for s in again] == [s["text"] for s in metrics["samples"]]
  np.testing.assert_allclose([s["score"] for s in again],
                             [s["score"] for s in metrics["samples"]], atol=1e-6)
