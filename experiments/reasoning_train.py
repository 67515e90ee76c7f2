"""Trains the tree search's policy and process reward model on the verifiable reasoning tasks.

    python -m experiments.reasoning_train --quick --out runs/reasoning_quick      # CPU, < 1 min
    python -m experiments.reasoning_train --out runs/reasoning                    # one H200
    python -m experiments.reasoning_train --family arithmetic --steps 2000 --max-minutes 5 \
        --out runs/reasoning_arith rollouts=0 model.n_layers=6                   # key=value

1. Tokenizer: a byte-level BPE (experiments.data) trained on a slice of the embedded corpus (the
   stdlib's source) plus generated solution texts; STEP ("\\n") must be one token.
2. Policy: the decoder trained on format_solution texts of noisy traces (error_rate 0.1, so
   the samples a search draws hold recoverable slips), the loss on the solution tokens and the
   end-of-text token after them, never on the prompt.
3. PRM (search.prm): the trained policy's weights plus a value head, trained on noisier traces
   (error_rate 0.3) with binary cross-entropy at each step's closing STEP token against the
   checker's StepCheck.reachable, and at the answer line's STEP and the end-of-text token
   against the answer's correctness (what a finished solution is scored by). With rollouts=K
   (the GPU preset: 4; --quick: 0, off), the first rollout_traces traces also get Math-Shepherd hard
   estimates (arXiv 2312.08935, Sec. 3.3): a step is good when any of K sampled policy
   continuations from it reaches a correct answer; the target is then (1 - rollout_weight) *
   checker + rollout_weight * estimate.
4. Evaluation of the saved (bfloat16-rounded) weights on held-out problems (prompts never seen
   in training): the policy's greedy accuracy (kvcache.generate, exact check_answer), the PRM's
   step-label accuracy and AUC on held-out noisy traces, and the outcome AUC of its score on
   the policy's own greedy solutions.

Writes <out>/policy/ and <out>/prm/ (save_model's bfloat16 safetensors shards + tokenizer.json;
`load_reasoning` reads both back), <out>/metrics.json, and results/reasoning_train_<backend>.json
(--quick: into <out> unless --results is given) with the losses against steps.

Sizes: --quick is a 0.1M-parameter model on toy problems for the CPU (about 40 s on two cores);
the default (ReasoningConfig.gpu) is a ~13M model (8 layers, d 384) on 4-number countdown /
3-step word problems: with max_minutes=5.0, 278 s on one H200 (120 s of it data preparation;
greedy accuracy 33%, PRM step AUC 0.97: results/reasoning_train_gpu.json).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from tqdm.auto import tqdm

from colm.config import ModelConfig, resolve_dtype
from experiments import reasoning as R
from experiments.results import RESULTS_DIR, write_results

ROLLOUT_BATCH = 256  # prefixes per generate call when estimating rollout labels
EVAL_BATCH = 256  # prompts per generate call in the greedy evaluation
SAMPLES = 4  # held-out problems whose outputs metrics.json records (the round-trip check)


# --------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class ReasoningConfig:
  """Everything one run needs; presets `quick` (CPU) and `gpu` (one H200)."""

  family: str = "countdown"  # task family, one of experiments.reasoning.FAMILIES
  seed: int = 0  # problems, traces, init and batch order
  model: ModelConfig = ModelConfig()  # policy and PRM trunk (vocab_size: the tokenizer's)
  vocab_size: int = 2048  # BPE vocabulary requested (the trained one may be smaller)
  corpus_bytes: int = 2_000_000  # stdlib source bytes in the tokenizer's training text
  countdown: R.CountdownSpec = R.CountdownSpec()  # problem settings of each family
  arithmetic: R.ArithmeticSpec = R.ArithmeticSpec()
  train_problems: int = 50000  # distinct training problems (traces cycle over them)
  eval_problems: int = 512  # held-out problems for the greedy accuracy
  policy_traces: int = 200000  # noisy traces the policy trains on
  policy_error_rate: float = 0.1
  prm_traces: int = 100000  # noisy traces the PRM trains on
  prm_error_rate: float = 0.3
  eval_traces: int = 2000  # held-out noisy traces for the PRM's step metrics
  policy_steps: int = 4000
  prm_steps: int = 2000
  batch_size: int = 256  # sequences per step (both phases)
  lr: float = 1e-3  # policy peak learning rate (AdamW, warm-up then cosine)
  prm_lr: float = 3e-4  # PRM peak learning rate (it starts from the trained policy)
  warmup_steps: int = 200  # capped at a fifth of each phase's steps
  rollouts: int = 0  # Math-Shepherd continuations per step (0: checker labels only)
  rollout_traces: int = 2048  # PRM traces that get rollout estimates
  rollout_weight: float = 0.5  # weight of the estimate in the soft target
  gen_tokens: int = 96  # new tokens per greedy solution / rollout (capped by max_seq_len)
  max_minutes: float = 8.0  # training budget (data preparation and evaluation not counted): the
  # policy may use 65% of it, rollouts and the PRM the rest

  def __post_init__(self):
    if self.family not in R.FAMILIES:
      raise ValueError(f"unknown family {self.family!r}; expected one of {', '.join(R.FAMILIES)}")
    for name in ("policy_steps", "prm_steps", "batch_size", "train_problems", "eval_problems",
                 "policy_traces", "prm_traces", "eval_traces", "gen_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("policy_error_rate", "prm_error_rate", "rollout_weight"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if self.rollouts < 0 or self.rollout_traces < 0 or self.warmup_steps < 0:
      raise ValueError(f"rollouts, rollout_traces and warmup_steps must be >= 0, got "
                       f"{self.rollouts}, {self.rollout_traces}, {self.warmup_steps}")
    if self.lr <= 0 or self.prm_lr <= 0 or self.max_minutes <= 0:
      raise ValueError(f"lr, prm_lr and max_minutes must be > 0, got {self.lr}, {self.prm_lr}, "
                       f"{self.max_minutes}")
    if self.vocab_size < 300:
      raise ValueError(f"vocab_size must be >= 300 (bytes + specials), got {self.vocab_size}")

  @classmethod
  def gpu(cls, **kw) -> ReasoningConfig:
    """~13M parameters (8 x d384, GQA 6/2 heads, bf16 compute), 200k policy / 100k PRM traces,
    Math-Shepherd rollouts (4 per step on 2048 traces): under 5 minutes on one H200 (the step
    caps, not the time budget, ended both phases there)."""
    model = ModelConfig(vocab_size=2048, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2,
                        head_dim=64, ffn_dim=1024, max_seq_len=256, dtype="bfloat16")
    return cls(**{"model": model, "rollouts": 4, **kw})

  @classmethod
  def quick(cls, **kw) -> ReasoningConfig:
    """CPU toy size: a 0.1M-parameter model, 3-number countdown / 2-step word problems, about
    40 s on two cores (the step counts, not the time budget, end the phases)."""
    model = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, ffn_dim=176, max_seq_len=128)
    base = dict(model=model, vocab_size=512, corpus_bytes=200_000,
                countdown=R.CountdownSpec(n_numbers=3, number_range=(1, 10),
                                          target_range=(5, 60), min_steps=2),
                arithmetic=R.ArithmeticSpec(n_steps=2, start_range=(5, 20), value_range=(2, 6),
                                            max_value=200),
                train_problems=2000, eval_problems=64, policy_traces=6000, prm_traces=4000,
                eval_traces=256, policy_steps=800, prm_steps=250, batch_size=32, lr=3e-3,
                prm_lr=1e-3, warmup_steps=20, rollout_traces=64, gen_tokens=48, max_minutes=1.0)
    if kw.get("family") == "arithmetic":  # ~3x longer rows: fewer steps in the same time
      base.update(policy_steps=400, prm_steps=120)
    return cls(**{**base, **kw})

  @property
  def spec(self) -> R.CountdownSpec | R.ArithmeticSpec:
    return self.countdown if self.family == "countdown" else self.arithmetic

  def problems(self, n: int, seed: int) -> list[R.Problem]:
    make = R.countdown if self.family == "countdown" else R.arithmetic
    return make(n, self.spec, seed=seed)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(cfg: ReasoningConfig, overrides: Sequence[str]) -> ReasoningConfig:
  """key=value overrides (model.d_model=256, countdown.n_numbers=5, rollouts=4); an unknown key
  or a value of the wrong type is a ValueError naming the key."""
  top: dict = {}
  nested: dict[str, dict] = {"model": {}, "countdown": {}, "arithmetic": {}}
  for o in overrides:
    key, sep, raw = o.partition("=")
    if not sep:
      raise ValueError(f"override {o!r} is not key=value")
    head, _, sub = key.partition(".")
    if sub and head not in nested:
      raise ValueError(f"unknown config key {key!r}")
    owner = getattr(cfg, head) if sub else cfg
    name = sub or head
    fields = {f.name for f in dataclasses.fields(owner)}
    if name not in fields or (not sub and name in nested):
      raise ValueError(f"unknown config key {key!r}")
    old, value = getattr(owner, name), _literal(raw)
    if isinstance(old, tuple) and isinstance(value, list | tuple):
      value = tuple(value)
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if type(value) is not type(old):
      raise ValueError(f"{key}: expected {type(old).__name__}, got {raw!r}")
    (nested[head] if sub else top)[name] = value
  for head, kw in nested.items():
    if kw:
      top[head] = dataclasses.replace(getattr(cfg, head), **kw)
  return dataclasses.replace(cfg, **top)


# --------------------------------------------------------------------------------------------------
# Data: traces, tokenizer, token rows.

Item = tuple[R.Problem, R.Trace]


def make_traces(problems: Sequence[R.Problem], n: int, error_rate: float, seed: int, stream: int
                ) -> list[Item]:
  """n noisy traces cycling over the problems; the same (seed, stream) gives the same traces."""
  rng = np.random.default_rng([seed, stream])
  return [(problems[i % len(problems)], R.noisy_trace(problems[i % len(problems)], rng,
                                                      error_rate)) for i in range(n)]


def solution_text(item: Item) -> str:
  problem, trace = item
  return R.format_solution(problem, trace.steps, trace.answer)


def build_tokenizer(texts: Sequence[str], vocab_size: int, corpus_bytes: int):
  """A byte-level BPE on `corpus_bytes` of the stdlib's source plus the given texts."""
  from experiments.data import _train_tokenizer, corpus_files
  corpus, size = [], 0
  for path in corpus_files("stdlib"):
    if size >= corpus_bytes:
      break
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    corpus.append(text[:corpus_bytes - size])
    size += len(corpus[-1])
  return _train_tokenizer([*corpus, *texts], vocab_size)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One trace as tokens.

  Attributes:
    ids: [n] int32, the solution text then end of text.
    prompt_len: tokens of the prompt line, its STEP included.
    ends: [k] positions carrying a PRM label: each step's closing STEP, the answer line's STEP
      and the end-of-text token.
    labels: [k] float32 targets at `ends`.
  """
  ids: np.ndarray
  prompt_len: int
  ends: np.ndarray
  labels: np.ndarray


def encode_items(tok, items: Sequence[Item], step_id: int, eot: int) -> list[Encoded]:
  """encode_item of many traces, tokenized in one parallel encode_batch call."""
  texts = [solution_text(x) for x in items]
  encs = tok.encode_batch(texts, add_special_tokens=False)
  return [_encoded(x, t, e.ids, step_id, eot) for x, t, e in zip(items, texts, encs)]


def encode_item(tok, item: Item, step_id: int, eot: int) -> Encoded:
  """Tokens and PRM labels of a trace: StepCheck.reachable at the steps, the answer's
  correctness (check_answer) at the answer line and the end of text."""
  text = solution_text(item)
  return _encoded(item, text, tok.encode(text, add_special_tokens=False).ids, step_id, eot)


def _encoded(item: Item, text: str, ids: list[int], step_id: int, eot: int) -> Encoded:
  problem, trace = item
  ids = np.asarray(ids + [eot], np.int32)
  stp = np.flatnonzero(ids == step_id)
  if len(stp) != len(trace.steps) + 2:  # prompt, steps, answer line
    raise ValueError(f"{text!r} has {len(stp)} STEP tokens, expected {len(trace.steps) + 2}")
  ok = float(R.check_answer(problem, text))
  labels = [float(c.reachable) for c in trace.checks] + [ok, ok]
  ends = np.concatenate([stp[1:], [len(ids) - 1]]).astype(np.int32)
  return Encoded(ids, int(stp[0]) + 1, ends, np.asarray(labels, np.float32))


def _fits(encs: list[Encoded], max_len: int) -> list[Encoded]:
  return [e for e in encs if len(e.ids) <= max_len]


def _length(encs: list[Encoded], cap: int) -> int:
  """The padded row length: the longest example, rounded up to 8, at most cap."""
  return min(cap, -(-max(len(e.ids) for e in encs) // 8) * 8)


def policy_rows(encs: Sequence[Encoded], length: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Token rows [B, length] (right-padded) and loss weights [B, length - 1] on the positions
  that predict a solution token or the end of text (never a prompt token)."""
  toks = np.full((len(encs), length), pad_id, np.int32)
  w = np.zeros((len(encs), length - 1), np.float32)
  for i, e in enumerate(encs):
    toks[i, :len(e.ids)] = e.ids
    w[i, e.prompt_len - 1:len(e.ids) - 1] = 1.0
  return toks, w


def prm_rows(encs: Sequence[Encoded], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token rows [B, length], the labelled positions [B, length] bool, the targets [B, length]."""
  toks = np.full((len(encs), length), pad_id, np.int32)
  mask = np.zeros((len(encs), length), bool)
  labels = np.zeros((len(encs), length), np.float32)
  for i, e in enumerate(encs):
    toks[i, :len(e.ids)] = e.ids
    mask[i, e.ends] = True
    labels[i, e.ends] = e.labels
  return toks, mask, labels


# --------------------------------------------------------------------------------------------------
# Saving and loading.


def as_saved(params: dict, dtype: str = "float32") -> dict:
  """The parameters as save_model stores them (rounded to bfloat16), in `dtype`."""
  dt = resolve_dtype(dtype)
  return {k: jnp.asarray(np.asarray(jax.device_get(v)).astype(ml_dtypes.bfloat16), dt)
          for k, v in params.items()}


def save_reasoning(folder: str | Path, cfg: ModelConfig, policy_params: dict, prm_params: dict,
                   tokenizer, step_token: int, info: dict) -> None:
  """<folder>/policy and <folder>/prm via longctx_train.save_model: the PRM's trunk under the
  Decoder's names (so load_model reads it), its head as value_head.kernel / value_head.bias."""
  from experiments.longctx_train import save_model
  folder = Path(folder)
  save_model(folder / "policy", cfg, policy_params, tokenizer, info)
  flat = {k.removeprefix("trunk."): v for k, v in prm_params.items()}
  save_model(folder / "prm", cfg, flat, tokenizer, {**info, "step_token": int(step_token)})


def load_reasoning(folder: str | Path):
  """(policy Decoder, PRM, tokenizers.Tokenizer, info) from save_reasoning's folder; info holds
  metrics.json (when written) and the run's settings."""
  from flax import nnx

  from experiments.longctx_train import load_model
  from experiments.safetensors_io import read_header, read_metadata, read_tensor
  from search.prm import PRM
  folder = Path(folder)
  policy, tok, info = load_model(folder / "policy")
  trunk, _, prm_info = load_model(folder / "prm")
  head = {}
  for i in range(int(read_metadata(folder / "prm" / "model-00000.safetensors")["shards"])):
    path = folder / "prm" / f"model-{i:05d}.safetensors"
    h, off = read_header(path)
    head.update({n: read_tensor(path, n, h, off) for n in h if n.startswith("value_head.")})
  if set(head) != {"value_head.kernel", "value_head.bias"}:
    raise KeyError(f"{folder / 'prm'}: value head tensors missing (found {sorted(head)})")
  prm = PRM.from_policy(trunk, step_token=prm_info["step_token"], rngs=nnx.Rngs(0))
  pd = resolve_dtype(trunk.cfg.param_dtype)
  prm.value_head.kernel[...] = jnp.asarray(head["value_head.kernel"], pd)
  prm.value_head.bias[...] = jnp.asarray(head["value_head.bias"], pd)
  metrics = folder / "metrics.json"
  if metrics.is_file():
    info = {**info, **json.loads(metrics.read_text())}
  return policy, prm, tok, {**info, "step_token": prm_info["step_token"]}


# --------------------------------------------------------------------------------------------------
# Training.


def _optimizer(steps: int, lr: float, warmup: int) -> optax.GradientTransformation:
  from experiments.config import TrainConfig
  from experiments.train import make_optimizer
  return make_optimizer(TrainConfig(steps=steps, lr=lr, warmup_steps=min(warmup, steps // 5)))


def train_phase(loss_fn: Callable, params: dict, steps: int, lr: float, warmup: int,
                batch: Callable[[int], tuple], deadline: float, desc: str
                ) -> tuple[dict, list[dict]]:
  """AdamW steps of loss_fn(params, *batch(step)) until `steps` or the wall-clock deadline.
  Returns the parameters and the loss curve [{step, loss}]."""
  tx = _optimizer(steps, lr, warmup)

  # Donating params and optimizer state halves their memory; the CPU backend cannot reuse
  # donated buffers (and warns), so only elsewhere.
  donate = () if jax.default_backend() == "cpu" else (0, 1)

  @functools.partial(jax.jit, donate_argnums=donate)
  def step(params, opt_state, *xs):
    loss, grads = jax.value_and_grad(loss_fn)(params, *xs)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  bar = tqdm(total=steps, desc=desc, mininterval=1.0)
  for s in range(steps):
    params, opt_state, loss = step(params, opt_state, *batch(s))
    losses.append(loss)
    if (s + 1) % 25 == 0 or s + 1 == steps:
      bar.set_postfix(loss=f"{float(loss):.4f}")  # a host sync every 25 steps only
    bar.update(1)
    if time.time() > deadline:
      break
  bar.close()
  return params, [{"step": i + 1, "loss": float(x)} for i, x in enumerate(jax.device_get(losses))]


# --------------------------------------------------------------------------------------------------
# Evaluation.


def roc_auc(scores, labels) -> float | None:
  """Area under the ROC curve (ties count half, Mann-Whitney), None without both classes."""
  s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
  pos, neg = int(y.sum()), int((~y).sum())
  if pos == 0 or neg == 0:
    return None
  _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
  ranks = (np.cumsum(cnt) - cnt + (cnt + 1) / 2)[inv]
  return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _prompt_ids(tok, problem: R.Problem) -> list[int]:
  return tok.encode(problem.prompt + R.STEP, add_special_tokens=False).ids


def greedy(policy, tok, problems: Sequence[R.Problem], max_new_tokens: int, eot: int
           ) -> list[list[int]]:
  """Greedy solutions (new tokens, the end of text included when produced), in batches of
  EVAL_BATCH (the last one padded by repetition: one compiled shape)."""
  from kvcache.decode import generate
  out = []
  for i in range(0, len(problems), EVAL_BATCH):
    chunk = [_prompt_ids(tok, p) for p in problems[i:i + EVAL_BATCH]]
    n = len(chunk)
    if len(problems) > EVAL_BATCH:
      chunk += [chunk[-1]] * (EVAL_BATCH - n)
    out += generate(policy, chunk, max_new_tokens=max_new_tokens, stop_tokens=[eot])[:n]
  return out


def _decode(tok, ids: Sequence[int], eot: int) -> str:
  return tok.decode([t for t in ids if t != eot], skip_special_tokens=False)


def reference_outputs(policy, prm, tok, problems: Sequence[R.Problem], max_new_tokens: int
                      ) -> list[dict]:
  """{prompt, text, score} of greedy solutions to a few problems (what a reloaded model must
  reproduce): the decoded text and the PRM's score of prompt + solution."""
  from experiments.data import eot_token_id
  from search.prm import PRMScorer
  eot = eot_token_id(tok)
  sols = greedy(policy, tok, problems, max_new_tokens, eot)
  paths = [_prompt_ids(tok, p) + s for p, s in zip(problems, sols)]
  scores = PRMScorer(prm).score(paths)
  return [{"prompt": p.prompt, "text": _decode(tok, s, eot), "score": float(x)}
          for p, s, x in zip(problems, sols, scores)]


def prm_metrics(prm, encs: Sequence[Encoded], length: int, pad_id: int, batch: int) -> dict:
  """Step-label accuracy (threshold 0.5) and AUC of sigmoid(values) at the labelled positions,
  apart for the steps and for the answer (answer line and end of text)."""
  from flax import nnx
  graphdef, state = nnx.split(prm)
  fn = jax.jit(lambda s, x: jax.nn.sigmoid(nnx.merge(graphdef, s).values(x)))
  step_p, step_y, ans_p, ans_y = [], [], [], []
  for i in range(0, len(encs), batch):
    chunk = list(encs[i:i + batch])
    n = len(chunk)
    toks, _, _ = prm_rows(chunk + [chunk[-1]] * (batch - n), length, pad_id)
    p = np.asarray(fn(state, toks))[:n]
    for row, e in zip(p, chunk):
      k = len(e.ends) - 2
      step_p += row[e.ends[:k]].tolist()
      step_y += e.labels[:k].tolist()
      ans_p += row[e.ends[k:]].tolist()
      ans_y += e.labels[k:].tolist()
  sp, sy, ap, ay = (np.asarray(x) for x in (step_p, step_y, ans_p, ans_y))
  return {"prm_step_accuracy": float(np.mean((sp > 0.5) == (sy > 0.5))),
          "prm_step_auc": roc_auc(sp, sy > 0.5), "prm_step_positive_rate": float(np.mean(sy)),
          "prm_answer_accuracy": float(np.mean((ap > 0.5) == (ay > 0.5))),
          "prm_answer_auc": roc_auc(ap, ay > 0.5), "prm_steps_scored": int(sp.size)}


def rollout_labels(policy, tok, items: Sequence[Item], encs: Sequence[Encoded], k: int,
                   max_new_tokens: int, seed: int) -> list[np.ndarray]:
  """Math-Shepherd hard estimates: per trace, [steps] float32, 1 when any of k continuations
  sampled (temperature 1) from the prefix through the step reaches a correct answer, 0 when
  none does, NaN when the prefix leaves the context no room to continue (no estimate)."""
  from experiments.data import eot_token_id
  from kvcache.decode import generate
  from kvcache.sampling import SamplingConfig
  eot = eot_token_id(tok)
  jobs = [(i, j) for i, (_, tr) in enumerate(items) for j in range(len(tr.steps))]
  hit = [np.full(len(tr.steps), np.nan, np.float32) for _, tr in items]
  cap = policy.cfg.max_seq_len
  per = max(1, ROLLOUT_BATCH // k)
  for c in tqdm(range(0, len(jobs), per), desc="rollouts", mininterval=1.0):
    chunk = jobs[c:c + per]
    prompts = [encs[i].ids[:encs[i].ends[j] + 1].tolist() for i, j in chunk for _ in range(k)]
    room = (cap - max(len(p) for p in prompts)) // 8 * 8  # few distinct compiled lengths
    if room < 8:
      continue
    outs = generate(policy, prompts, max_new_tokens=min(max_new_tokens, room),
                    sampling=SamplingConfig(temperature=1.0), seed=seed + c, stop_tokens=[eot])
    for r, (i, j) in enumerate(x for x in chunk for _ in range(k)):
      problem, trace = items[i]
      prefix = "".join(s + R.STEP for s in trace.steps[:j + 1])
      ok = R.check_answer(problem, prefix + _decode(tok, outs[r], eot))
      hit[i][j] = max(0.0 if np.isnan(hit[i][j]) else hit[i][j], float(ok))
  return hit


# --------------------------------------------------------------------------------------------------
# The run.


def held_out_problems(cfg: ReasoningConfig, train: Sequence[R.Problem]) -> list[R.Problem]:
  """cfg.eval_problems problems of another seed whose prompts no training problem has."""
  seen = {p.prompt for p in train}
  out = [p for p in cfg.problems(4 * cfg.eval_problems, cfg.seed + 1) if p.prompt not in seen]
  if not out:
    raise ValueError(f"no held-out problems: every prompt of seed {cfg.seed + 1} is in the "
                     f"training set; widen the {cfg.family} spec")
  return out[:cfg.eval_problems]


def run(cfg: ReasoningConfig, out: Path, results_dir: Path, tag: str = "") -> dict:
  """Trains policy and PRM, evaluates, saves; returns the metrics (see the module docstring)."""
  from flax import nnx

  from colm.model import Decoder
  from colm.params import ParamCodec
  from experiments.data import PAD, eot_token_id
  from experiments.longctx_train import _ce
  from search.prm import PRM, PRMScorer, prm_loss
  t_start = time.time()
  print(f"jax {jax.__version__} on {jax.devices()} (python {platform.python_version()})")
  print("config:", json.dumps(cfg.to_dict(), default=str))
  train = cfg.problems(cfg.train_problems, cfg.seed)
  held = held_out_problems(cfg, train)
  pol_items = make_traces(train, cfg.policy_traces, cfg.policy_error_rate, cfg.seed, 1)
  prm_items = make_traces(train, cfg.prm_traces, cfg.prm_error_rate, cfg.seed, 2)
  ev_items = make_traces(held, cfg.eval_traces, cfg.prm_error_rate, cfg.seed, 3)
  tok = build_tokenizer([solution_text(x) for x in pol_items[:5000]], cfg.vocab_size,
                        cfg.corpus_bytes)
  step_id = R.step_token_id(lambda s: tok.encode(s, add_special_tokens=False).ids)
  eot, pad = eot_token_id(tok), tok.token_to_id(PAD)
  mc = cfg.model.replace(vocab_size=tok.get_vocab_size())
  enc = lambda items: encode_items(tok, items, step_id, eot)
  cap = mc.max_seq_len
  pol_enc = _fits(enc(pol_items), cap + 1)
  prm_keep = [(x, e) for x, e in zip(prm_items, enc(prm_items)) if len(e.ids) <= cap]
  ev_enc = _fits(enc(ev_items), cap)
  t_data = time.time() - t_start
  print(f"data: {len(train)} problems, {len(held)} held out, {len(pol_enc)} policy / "
        f"{len(prm_keep)} PRM / {len(ev_enc)} eval traces, vocab {mc.vocab_size}, "
        f"{mc.num_params() / 1e6:.2f}M params ({t_data:.1f} s)", flush=True)

  # (a) the policy.
  policy = Decoder(mc, rngs=nnx.Rngs(cfg.seed))
  codec = ParamCodec(policy)
  pl = _length(pol_enc, cap + 1)
  pol_toks, pol_w = policy_rows(pol_enc, pl, pad)
  rng = np.random.default_rng([cfg.seed, 4])

  def pol_loss(params, x, w):
    model = codec.merge(params)
    return _ce(model(x[:, :-1], logits_dtype=model.cfg.dtype), x[:, 1:], w)

  def pol_batch(_):
    idx = rng.integers(len(pol_enc), size=cfg.batch_size)
    return pol_toks[idx], pol_w[idx]

  t0 = time.time()  # the training budget starts here (data preparation is not in it)
  deadline = t0 + 60 * cfg.max_minutes
  pol_params, pol_curve = train_phase(
      pol_loss, codec.params(policy), cfg.policy_steps, cfg.lr, cfg.warmup_steps, pol_batch,
      t0 + 0.65 * 60 * cfg.max_minutes, "policy")
  t_policy = time.time() - t0
  policy = codec.merge(as_saved(pol_params, mc.param_dtype))

  # (b) the PRM, from the policy's weights.
  gen = lambda longest: max(1, min(cfg.gen_tokens, cap - longest))
  t0 = time.time()
  n_roll = min(cfg.rollout_traces, len(prm_keep)) if cfg.rollouts else 0
  if n_roll:
    items, encs = [x for x, _ in prm_keep[:n_roll]], [e for _, e in prm_keep[:n_roll]]
    est = rollout_labels(policy, tok, items, encs, cfg.rollouts, cfg.gen_tokens, cfg.seed)
    a = cfg.rollout_weight
    for i, (e, h) in enumerate(zip(encs, est)):
      lab = e.labels.copy()
      h = np.where(np.isnan(h), lab[:len(h)], h)  # no estimate: the checker's label alone
      lab[:len(h)] = (1 - a) * lab[:len(h)] + a * h
      prm_keep[i] = (items[i], dataclasses.replace(e, labels=lab))
  t_rollouts = time.time() - t0
  prm_enc = [e for _, e in prm_keep]
  prm = PRM.from_policy(policy, step_token=step_id, rngs=nnx.Rngs(cfg.seed + 1))
  prm_codec = ParamCodec(prm)
  ql = _length(prm_enc, cap)
  prm_toks, prm_mask, prm_lab = prm_rows(prm_enc, ql, pad)

  def value_loss(params, x, m, y):
    return prm_loss(prm_codec.merge(params), x, m, y)

  def prm_batch(_):
    idx = rng.integers(len(prm_enc), size=cfg.batch_size)
    return prm_toks[idx], prm_mask[idx], prm_lab[idx]

  t0 = time.time()
  prm_params, prm_curve = train_phase(value_loss, prm_codec.params(prm), cfg.prm_steps,
                                      cfg.prm_lr, cfg.warmup_steps, prm_batch, deadline, "prm")
  t_prm = time.time() - t0
  prm_params = as_saved(prm_params, mc.param_dtype)
  prm = prm_codec.merge(prm_params)

  # Evaluation of the weights as saved.
  t0 = time.time()
  longest = max(len(_prompt_ids(tok, p)) for p in held)
  sols = greedy(policy, tok, held, gen(longest), eot)
  correct = [R.check_answer(p, _decode(tok, s, eot)) for p, s in zip(held, sols)]
  outcome = PRMScorer(prm).score([_prompt_ids(tok, p) + s for p, s in zip(held, sols)])
  metrics = {"policy_accuracy": float(np.mean(correct)), "policy_eval_problems": len(held),
             "policy_stopped": float(np.mean([bool(s) and s[-1] == eot for s in sols])),
             **prm_metrics(prm, ev_enc, _length(ev_enc, cap), pad, min(256, len(ev_enc))),
             "prm_outcome_auc": roc_auc(outcome, correct)}
  samples = reference_outputs(policy, prm, tok, held[:SAMPLES], gen(longest))
  t_eval = time.time() - t0

  info = {"family": cfg.family, "spec": dataclasses.asdict(cfg.spec), "seed": cfg.seed,
          "step_token": step_id, "eot": eot,
          "gen_tokens": gen(longest), "policy_steps": len(pol_curve),
          "prm_steps": len(prm_curve)}
  out.mkdir(parents=True, exist_ok=True)
  save_reasoning(out, mc, pol_params, prm_params, tok, step_id, info)
  wall = time.time() - t_start
  times = {"data_s": t_data, "policy_s": t_policy, "rollouts_s": t_rollouts, "prm_s": t_prm,
           "eval_s": t_eval, "wall_s": wall}
  record = {**info, **metrics, "times": times, "samples": samples,
            "params": mc.num_params(), "model_config": dataclasses.asdict(mc),
            "config": cfg.to_dict(), "rollout_traces_used": n_roll}
  (out / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
  thin = lambda c: c[::max(1, len(c) // 500)]
  path = write_results(f"reasoning_train{tag}", {
      **record, "policy_curve": thin(pol_curve), "prm_curve": thin(prm_curve),
      "model_dir": str(out)}, results_dir)
  f3 = lambda x: "n/a" if x is None else f"{x:.3f}"
  print(f"policy greedy accuracy {f3(metrics['policy_accuracy'])} on {len(held)} held-out "
        f"problems | PRM step accuracy {f3(metrics['prm_step_accuracy'])} (positives "
        f"{f3(metrics['prm_step_positive_rate'])}) AUC {f3(metrics['prm_step_auc'])} | outcome "
        f"AUC {f3(metrics['prm_outcome_auc'])} | {wall:.1f} s")
  print(f"wrote {out} and {path}")
  return record


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments.reasoning_train")
  ap.add_argument("overrides", nargs="*", help="key=value config overrides (ReasoningConfig)")
  ap.add_argument("--quick", action="store_true", help="CPU toy sizes (under a minute)")
  ap.add_argument("--family", default="countdown", help=f"one of {', '.join(R.FAMILIES)}")
  ap.add_argument("--steps", type=int, default=None, help="optimizer steps of each phase")
  ap.add_argument("--max-minutes", type=float, default=None, help="training wall-clock budget")
  ap.add_argument("--out", required=True, help="where the models and metrics.json go")
  ap.add_argument("--results", default=None,
                  help="results folder (default results/; --quick: --out)")
  ap.add_argument("--tag", default="", help="suffix of the results file's name")
  args = ap.parse_args(argv)
  try:
    if args.family not in R.FAMILIES:
      raise ValueError(f"unknown family {args.family!r}; expected one of {', '.join(R.FAMILIES)}")
    if args.steps is not None and args.steps < 1:
      raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.max_minutes is not None and args.max_minutes <= 0:
      raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    kw = {"family": args.family}
    if args.steps is not None:
      kw.update(policy_steps=args.steps, prm_steps=args.steps)
    if args.max_minutes is not None:
      kw["max_minutes"] = args.max_minutes
    cfg = (ReasoningConfig.quick if args.quick else ReasoningConfig.gpu)(**kw)
    cfg = apply_overrides(cfg, args.overrides)
  except ValueError as e:
    raise SystemExit(f"reasoning_train: {e}") from None
  results = Path(args.results) if args.results else (Path(args.out) if args.quick
                                                      else RESULTS_DIR)
  return run(cfg, Path(args.out), results, args.tag)


if __name__ == "__main__":
  main()
