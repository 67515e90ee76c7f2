"""S2-Attention's claims re-measured (issue 18, items 2 and 3): retrieval trained to convergence,
and language-model quality at matched settings on the larger corpus.

    python -m experiments.s2_claims retrieval --quick       # CPU, tiny sizes, a few minutes
    python -m experiments.s2_claims retrieval               # GPU: 4 variants x 2 seeds
    python -m experiments.s2_claims retrieval --task needle # the suite's needle in corpus text
    python -m experiments.s2_claims quality                 # GPU: dense / SDSD / SSSD x 2 seeds
    python -m experiments.s2_claims retrieval --variants sssd --seeds 1 --append

Variants are named by their four layers, D dense and S S2 at vertical stride 8 (64-token blocks,
a 512-token local window): dense (DDDD), sssd (the dense-last hybrid), sdsd (alternating) and
ssss (all S2). Every run of an experiment has the same model, optimizer and data; only the
layers' attention differs, and each seed sets both the initialisation and the data order.

`retrieval`: synthetic passkey (5-digit values in uniform random filler; `--task passkey`, the
default) or the long-context suite's single needle (`--task needle`: experiments.longctx.needle, a
key's 7-digit number in corpus text under the corpus' BPE tokenizer, prompts of at most n - 64
tokens in an n-token input), lengths cycling 512, 1K, 2K and 4K at equal tokens per step, needle
depths uniform on [0.02, 0.98]. Every `--eval-every` steps, exact match (teacher-forced, which
equals greedy decoding's verdict) on a lengths x depths grid, 64 examples per cell, the same
examples for every run. A run stops at
`--max-steps`, or once every cell is >= 99% at `--patience` evaluations in a row, or at its
`--budget-s`. Recorded: accuracy curves, steps to a 90% grid mean, to 90% and to 99% in every
cell, the final grid. Target: every hybrid >= 99% on each cell where dense is >= 99%.

`quality`: next-token loss on `data.source=python` at 4K context (capped at 4 epochs), validation
loss overall and over target positions >= 512 and >= 2048 on fixed validation batches. Target:
each bucket within 2% of dense, or within twice the seed spread.

Writes results/s2_retrieval[_needle]_<backend>.json / s2_quality_<backend>.json and their plots
(`--tag` appends to the names), rewritten after every run; `--append` keeps the runs of an
earlier file that this call does not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.config import load_config
from experiments.results import RESULTS_DIR, write_results
from experiments.tasks import PasskeyTask, evaluate_grid, plot_grid, teacher_forced_correct

S2_SPEC = "s2:block_size=64,local_blocks=8,vert_stride=8"
QUICK_S2_SPEC = "s2:block_size=16,local_blocks=2,vert_stride=8"  # a 32-token window
VARIANTS = {"dense": "DDDD", "sssd": "SSSD", "sdsd": "SDSD", "ssss": "SSSS"}
QUALITY_VARIANTS = ("dense", "sdsd", "sssd")


def buckets(seq_len: int) -> tuple[int, ...]:
  """Quality: the position buckets (losses over target positions >= each): 0, seq/8 and seq/2
  (0, 512, 2048 at 4K context)."""
  return (0, seq_len // 8, seq_len // 2)
MAX_EPOCHS = 4.0

# Retrieval: a 4-layer model of width 256 with 8 heads, so that stride 8 covers the context with
# one shard per head.
RETRIEVAL_GPU = ["model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4",
                 "model.head_dim=32", "model.ffn_dim=704", "model.vocab_size=1024",
                 "seq_len=4096", "batch_size=8", "steps=10000", "warmup_steps=200", "lr=1e-3"]
RETRIEVAL_QUICK = ["model.d_model=64", "model.n_heads=8", "model.n_kv_heads=4",
                   "model.head_dim=8", "model.ffn_dim=176", "model.vocab_size=320",
                   "model.max_seq_len=256", "model.dtype=float32", "seq_len=256", "batch_size=2",
                   "steps=40", "warmup_steps=4", "lr=3e-3"]
# Quality: the s2_*.yaml model (d_model 512, 16 heads) as written.
QUALITY_GPU = ["data.source=python", "steps=2000", "warmup_steps=100", "eval_batches=16"]
QUALITY_QUICK = ["model.d_model=64", "model.n_heads=8", "model.n_kv_heads=4", "model.head_dim=8",
                 "model.ffn_dim=176", "model.vocab_size=512", "model.max_seq_len=256",
                 "model.dtype=float32", "seq_len=256", "batch_size=2", "steps=30",
                 "warmup_steps=3", "lr=3e-3", "eval_batches=2", "data.max_bytes=2000000"]
# Retrieval on the suite's needle: a BPE vocabulary of 1024 (text prompts); quick: 512 tokens, so
# that a prompt holds the needle's header, needle and question.
NEEDLE_GPU = ["data.source=stdlib"]
NEEDLE_QUICK = ["model.vocab_size=1024", "model.max_seq_len=512", "seq_len=512",
                "data.max_bytes=3000000"]


def layer_attn(code: str, spec: str) -> list[str]:
  """'SDSD' -> the per-layer attention specs (D: the model's dense 'auto', S: `spec`)."""
  if not code or set(code) - {"D", "S"}:
    raise ValueError(f"a layer code is a string of D and S, got {code!r}")
  return [spec if c == "S" else "auto" for c in code]


def _layer_override(code: str, spec: str) -> str:
  return "model.layer_attn=[" + ",".join(f"'{s}'" for s in layer_attn(code, spec)) + "]"


def run_config(variant: str, seed: int, base: Sequence[str], quick: bool):
  """The TrainConfig of one run: s2_dense.yaml with `base` overrides, the variant's layers and
  the seed."""
  spec = QUICK_S2_SPEC if quick else S2_SPEC
  return load_config("s2_dense", [*base, _layer_override(VARIANTS[variant], spec),
                                  f"seed={seed}"])


def nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in float32: logits [B, T, V], targets [B, T] -> [B, T]."""
  logits = logits.astype(jnp.float32)
  return (jax.nn.logsumexp(logits, -1)
          - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])


def _train_step(codec, tx, loss: Callable):
  """jit(params, opt_state, *batch) -> (params, opt_state, loss); params and state donated."""
  def step(params, opt_state, *batch):
    value, grads = jax.value_and_grad(lambda p: loss(codec.merge(p), *batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return jax.jit(step, donate_argnums=(0, 1))


def _first_step(evals: list[dict], ok: Callable[[dict], bool]) -> int | None:
  return next((e["step"] for e in evals if ok(e)), None)


# Retrieval ----------------------------------------------------------------------------------------

def retrieval_shapes(seq: int, batch: int, min_len: int = 512) -> list[tuple[int, int]]:
  """(batch, length) of the training batches, cycled over the steps: lengths seq, seq/2, ...
  down to min_len (at least 32 tokens), each with the batch scaled to seq * batch tokens."""
  out, n = [], seq
  while n >= max(min_len, 32):
    out.append((batch * seq // n, n))
    n //= 2
  return out[::-1]


def grid_scorer(codec, batch: int) -> Callable:
  """A scorer for tasks.evaluate_grid at given params: scorer(params)(examples) -> bool [n];
  one compile per length (fixed batch shape, the last chunk padded)."""
  from experiments.longctx_train import argmax_predictor
  predict = argmax_predictor(codec)

  def at(params):
    def run(examples):
      out = []
      for i in range(0, len(examples), batch):
        chunk = list(examples[i:i + batch])
        toks = np.stack([e.tokens for e in chunk])
        if len(chunk) < batch:
          toks = np.concatenate([toks, np.repeat(toks[-1:], batch - len(chunk), 0)])
        out.append(teacher_forced_correct(np.asarray(predict(params, toks))[:len(chunk)], chunk))
      return np.concatenate(out)
    return run
  return at


class PasskeyGrid:
  """Retrieval on the synthetic passkey (tasks.PasskeyTask): training batches and the grid.

  batch(rng, b, n) -> tokens int32 [b, n + 1], answer weights float32 [b, n]; grid(params) ->
  exact match [depths][lengths] on the same examples at every call and in every run.
  """
  name = "passkey"

  def __init__(self, cfg, codec, *, lengths, depths, samples: int, digits: int,
               depth_range: tuple[float, float], eval_seed: int = 1234):
    self.task = PasskeyTask.synthetic(cfg.model_config().vocab_size, value_digits=digits)
    self.lengths, self.depths, self.samples = lengths, depths, samples
    self.depth_range, self.eval_seed = depth_range, eval_seed
    self.scorer = grid_scorer(codec, min(samples, 64))

  def batch(self, rng: np.random.Generator, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return self.task.batch(rng, b, n + 1, depth_range=self.depth_range)

  def grid(self, params) -> list[list[float]]:
    return evaluate_grid(self.scorer(params), self.task, self.lengths, self.depths,
                         samples=self.samples, seed=self.eval_seed)["accuracy"]

  def info(self) -> dict:
    return {}

  def close(self) -> None:
    pass


class NeedleGrid:
  """Retrieval on the long-context suite's single needle (experiments.longctx.needle: a key's
  7-digit magic number in corpus text, RULER's wording) under the corpus' BPE tokenizer.

  A model input of n tokens holds a prompt of at most n - TARGET_TOKENS tokens, then the target
  (the number, a full stop, end of text) and padding; the loss and exact match cover the target.
  Training examples come from the corpus' 'train' files, drawn by worker processes while the
  model trains (longctx_train.ExampleStream: a replay of earlier examples when they fall behind;
  info() gives the share of fresh rows); the grid's examples from the 'val' files, the same in
  every run. Which rows a step replays depends on the workers' timing, so unlike the passkey,
  two runs of one seed do not see the same data.
  """
  name = "needle"

  def __init__(self, cfg, codec, *, lengths, depths, samples: int, train_lengths,
               depth_range: tuple[float, float], workers: int | None = None,
               eval_seed: int = 1234, data=None):
    from experiments.longctx_train import (
      TARGET_TOKENS,
      ExampleStream,
      argmax_predictor,
      exact_match,
      rows,
    )
    from experiments.train import prepare_data
    data = prepare_data(cfg, progress=False) if data is None else data
    self.pad, self._rows, self._T = data.pad_id, rows, TARGET_TOKENS
    self.lengths, self.depths = list(lengths), list(depths)
    short = [n for n in {*lengths, *train_lengths} if n - TARGET_TOKENS < 64]
    if short:
      raise ValueError(f"needle inputs of {sorted(short)} tokens leave prompts under 64 tokens "
                       f"(each input holds {TARGET_TOKENS} target tokens)")
    workers = workers or max(1, min(14, (os.cpu_count() or 2) - 2))
    self.stream = ExampleStream(data.tokenizer.to_str(), cfg.data.source, ["needle"],
                                [n - TARGET_TOKENS for n in train_lengths], cfg.seed, workers,
                                gen_kwargs={"depth_range": tuple(depth_range)})
    drawn = self.stream.eval_set([("needle", n - TARGET_TOKENS, eval_seed, samples, "val", d)
                                  for d in self.depths for n in self.lengths])
    self.cells = [[[(p, t) for _, ln, p, t, dd in drawn if ln == n - TARGET_TOKENS and dd == d]
                   for n in self.lengths] for d in self.depths]
    predict = argmax_predictor(codec)
    self._match = lambda params, exs, n: exact_match(lambda x: predict(params, x), exs,
                                                     n - TARGET_TOKENS, self.pad, min(samples, 64))

  def batch(self, rng: np.random.Generator, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return self._rows(self.stream.take(rng, n - self._T, b), n - self._T, self.pad)

  def grid(self, params) -> list[list[float]]:
    return [[float(np.mean(self._match(params, exs, n))) for exs, n in zip(row, self.lengths)]
            for row in self.cells]

  def info(self) -> dict:
    s = self.stream
    return {"fresh_rows": s.n_fresh, "reused_rows": s.n_reused,
            "fresh_share": s.n_fresh / max(1, s.n_fresh + s.n_reused)}

  def close(self) -> None:
    self.stream.close()


def train_retrieval(variant: str, seed: int, base: Sequence[str], *, quick: bool,
                    eval_every: int, lengths: Sequence[int], depths: Sequence[float],
                    samples: int, digits: int, patience: int, budget_s: float | None,
                    depth_range: tuple[float, float] = (0.02, 0.98), task: str = "passkey",
                    data=None) -> dict:
  """Trains one variant on a retrieval task (passkey or needle) and evaluates its grid every
  `eval_every` steps.

  Returns the run's row: evals [{step, loss, mean, min, accuracy}], steps to 90% / 99%, the
  final grid, why it stopped, step time and wall time.
  """
  from experiments.train import Trainer
  cfg = run_config(variant, seed, base, quick)
  trainer = Trainer(cfg)
  mc, codec = trainer.model_cfg, trainer.codec
  state = trainer.init_state()
  params, opt_state = state.params, state.opt_state
  shapes = retrieval_shapes(cfg.seq_len, cfg.batch_size, min(lengths))
  if task == "passkey":
    grid_task = PasskeyGrid(cfg, codec, lengths=lengths, depths=depths, samples=samples,
                            digits=digits, depth_range=depth_range)
  elif task == "needle":
    grid_task = NeedleGrid(cfg, codec, lengths=lengths, depths=depths, samples=samples,
                           train_lengths=[n for _, n in shapes], depth_range=depth_range,
                           data=data)
  else:
    raise ValueError(f"unknown retrieval task {task!r}; known: passkey, needle")

  def loss(model, tt, w):
    return jnp.sum(nll(model(tt[:, :-1]), tt[:, 1:]) * w) / jnp.maximum(jnp.sum(w), 1.0)
  step = _train_step(codec, trainer.tx, loss)
  rng = np.random.default_rng([seed, 7])
  evals, losses, reason = [], [], "max_steps"
  t_start, eval_s, streak, s = time.time(), 0.0, 0, 0
  try:
    for s in range(1, cfg.steps + 1):
      b, n = shapes[(s - 1) % len(shapes)]
      tt, w = grid_task.batch(rng, b, n)
      params, opt_state, value = step(params, opt_state, tt, w)
      losses.append(value)  # a device scalar: no host sync between evaluations
      if s % eval_every and s != cfg.steps:
        continue
      jax.block_until_ready(value)
      t0 = time.perf_counter()
      acc = np.asarray(grid_task.grid(params))
      recent = [float(x) for x in losses[-eval_every:]]
      evals.append({"step": s, "loss": float(np.mean(recent)), "mean": float(acc.mean()),
                    "min": float(acc.min()), "accuracy": acc.tolist(),
                    "wall_s": time.time() - t_start, **grid_task.info()})
      losses.clear()
      eval_s += time.perf_counter() - t0
      print(f"  {variant} seed {seed} step {s}: loss {evals[-1]['loss']:.4f} grid mean "
            f"{acc.mean():.3f} min {acc.min():.3f} ({time.time() - t_start:.0f} s)", flush=True)
      streak = streak + 1 if acc.min() >= 0.99 else 0
      if streak >= patience:
        reason = "converged"
        break
      if budget_s is not None and time.time() - t_start > budget_s:
        reason = "budget"
        break
  finally:
    grid_task.close()
  wall = time.time() - t_start
  return {"variant": variant, "layers": VARIANTS[variant], "seed": seed, "task": grid_task.name,
          "layer_attn": list(mc.layer_attn), "params": mc.num_params(), "steps": s,
          "stopped": reason, "tokens_per_step": cfg.batch_size * cfg.seq_len,
          "steps_to_90_mean": _first_step(evals, lambda e: e["mean"] >= 0.9),
          "steps_to_90_all": _first_step(evals, lambda e: e["min"] >= 0.9),
          "steps_to_99_all": _first_step(evals, lambda e: e["min"] >= 0.99),
          "final": {"lengths": list(map(int, lengths)), "depths": list(map(float, depths)),
                    "accuracy": evals[-1]["accuracy"], "samples": samples,
                    "mean": evals[-1]["mean"]},
          "evals": evals, "step_s": (wall - eval_s) / max(s, 1), "eval_s": eval_s,
          "wall_s": wall, **grid_task.info()}


def retrieval_verdict(runs: Sequence[dict]) -> dict:
  """The target, per seed and hybrid: the cells where dense's final grid is >= 99% and the
  hybrid's is not; 'confirmed' when there are none on every seed, 'inconclusive' when dense
  reaches 99% on no cell or a run is missing, else 'not confirmed'."""
  out, outcome = {}, "confirmed"
  seeds = sorted({r["seed"] for r in runs})
  for v in (v for v in VARIANTS if v != "dense"):
    per_seed = {}
    for seed in seeds:
      dense = next((r for r in runs if r["variant"] == "dense" and r["seed"] == seed), None)
      hyb = next((r for r in runs if r["variant"] == v and r["seed"] == seed), None)
      if dense is None or hyb is None:
        continue
      d, h = np.asarray(dense["final"]["accuracy"]), np.asarray(hyb["final"]["accuracy"])
      g = dense["final"]
      fails = [[g["depths"][i], g["lengths"][j]] for i, j in zip(*np.nonzero((d >= 0.99)
                                                                              & (h < 0.99)))]
      per_seed[str(seed)] = {"dense_cells_99": int((d >= 0.99).sum()), "cells": int(d.size),
                             "failed_cells": fails}
    if not per_seed:
      continue
    if any(x["dense_cells_99"] == 0 for x in per_seed.values()) or len(per_seed) < len(seeds):
      verdict = "inconclusive"
    else:
      verdict = "not confirmed" if any(x["failed_cells"] for x in per_seed.values()) \
          else "confirmed"
    out[v] = {"per_seed": per_seed, "outcome": verdict}
    if verdict != "confirmed":
      outcome = verdict if outcome != "not confirmed" else outcome
  return {"hybrids": out, "outcome": outcome if out else "inconclusive"}


COLORS = {"dense": "k", "sssd": "tab:blue", "sdsd": "tab:orange", "ssss": "tab:red"}


def plot_retrieval(runs: Sequence[dict], path: Path, task: str = "passkey") -> Path:
  """Grid-mean and worst-cell accuracy vs step, a line per run (colour: variant, style: seed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  styles = ["-", "--", ":", "-."]
  for r in runs:
    st = [e["step"] for e in r["evals"]]
    for ax, key in zip(axes, ("mean", "min")):
      ax.plot(st, [e[key] for e in r["evals"]], styles[r["seed"] % 4],
              color=COLORS.get(r["variant"]), marker="o", ms=2,
              label=f"{r['variant']} ({r['layers']}) seed {r['seed']}")
  for ax, what in zip(axes, ("grid mean", "worst cell")):
    ax.axhline(0.9, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="training step", ylabel=f"exact match, {what}",
           title=f"{task} retrieval, {what}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def print_retrieval(results: dict) -> None:
  print(f"\n{'variant':8} {'seed':>4} {'steps':>6} {'stopped':>10} {'to 90% mean':>11} "
        f"{'to 90% all':>10} {'to 99% all':>10} {'final mean':>10} {'min':>5} {'ms/step':>8}")
  for r in results["runs"]:
    f = [("-" if r[k] is None else str(r[k]))
         for k in ("steps_to_90_mean", "steps_to_90_all", "steps_to_99_all")]
    acc = np.asarray(r["final"]["accuracy"])
    print(f"{r['variant']:8} {r['seed']:4d} {r['steps']:6d} {r['stopped']:>10} {f[0]:>11} "
          f"{f[1]:>10} {f[2]:>10} {acc.mean():10.3f} {acc.min():5.2f} "
          f"{1e3 * r['step_s']:8.1f}"
          + (f"  fresh rows {r['fresh_share']:.0%}" if "fresh_share" in r else ""))
  for v, x in results["verdict"]["hybrids"].items():
    print(f"  {v}: {x['outcome']}; " + "; ".join(
        f"seed {s}: {len(c['failed_cells'])} of the {c['dense_cells_99']} cells dense holds at "
        f"99% below it" for s, c in x["per_seed"].items()))
  print(f"outcome: {results['verdict']['outcome']}")


# Quality ------------------------------------------------------------------------------------------

def bucket_losses(token_nll: np.ndarray, starts: Sequence[int]) -> dict[str, float]:
  """Mean loss over target positions >= each bucket start: token_nll [T] (summed or averaged
  over batches, per position) -> {'>=0': ..., '>=512': ...}."""
  return {f">={b}": float(np.mean(token_nll[b:])) for b in starts if b < token_nll.shape[0]}


def train_quality(variant: str, seed: int, base: Sequence[str], data, *, quick: bool,
                  progress: bool = True) -> dict:
  """Trains one variant on the corpus (next-token loss) and returns its row: validation loss per
  position bucket at every evaluation and at the end, epochs, step time."""
  from experiments.train import Trainer
  cfg = run_config(variant, seed, base, quick)
  trainer = Trainer(cfg)
  mc, codec = trainer.model_cfg, trainer.codec
  train_tokens = int(data.train.size)
  steps = cfg.steps
  cap = int(MAX_EPOCHS * train_tokens // (cfg.batch_size * cfg.seq_len))
  if steps > cap:
    print(f"  {variant}: {steps} steps would read the corpus more than {MAX_EPOCHS:g} times; "
          f"capped at {cap}")
    steps = cap
  state = trainer.init_state()
  params, opt_state = state.params, state.opt_state
  step = _train_step(codec, trainer.tx,
                     lambda model, b: jnp.mean(nll(model(b[:, :-1]), b[:, 1:])))
  per_pos = jax.jit(lambda p, b: jnp.mean(nll(codec.merge(p)(b[:, :-1]), b[:, 1:]), 0))

  def evaluate(params) -> dict[str, float]:
    tot = sum(np.asarray(per_pos(params, data.batch("val", i, cfg.batch_size, cfg.seq_len, 0)),
                         np.float64) for i in range(cfg.eval_batches))
    return bucket_losses(tot / cfg.eval_batches, buckets(cfg.seq_len))

  evals, losses, t_start = [], [], time.time()
  for s in range(1, steps + 1):
    params, opt_state, value = step(params, opt_state,
                                    data.batch("train", s - 1, cfg.batch_size, cfg.seq_len, seed))
    losses.append(value)
    if s % cfg.eval_every and s != steps:
      continue
    ev = evaluate(params)
    evals.append({"step": s, "loss": float(np.mean([float(x) for x in losses])), "val": ev,
                  "wall_s": time.time() - t_start})
    losses.clear()
    if progress:
      print(f"  {variant} seed {seed} step {s}: train {evals[-1]['loss']:.4f} val "
            + " ".join(f"{k} {v:.4f}" for k, v in ev.items())
            + f" ({time.time() - t_start:.0f} s)", flush=True)
  wall = time.time() - t_start
  return {"variant": variant, "layers": VARIANTS[variant], "seed": seed,
          "layer_attn": list(mc.layer_attn), "params": mc.num_params(), "steps": steps,
          "tokens": steps * cfg.batch_size * cfg.seq_len,
          "epochs": steps * cfg.batch_size * cfg.seq_len / train_tokens,
          "val": evals[-1]["val"], "evals": evals, "step_s": wall / steps, "wall_s": wall}


def quality_verdict(runs: Sequence[dict]) -> dict:
  """Per hybrid and bucket: the gap of its seed-mean loss to dense's seed-mean, and the seed
  spread (the larger relative difference between seeds of dense and of the hybrid; 0 with one
  seed); a bucket passes at a gap <= 2% or <= twice the spread."""
  def by(v):
    return [r for r in runs if r["variant"] == v]
  dense = by("dense")
  out, outcome = {}, "confirmed"
  if not dense:
    return {"hybrids": {}, "outcome": "inconclusive"}
  for v in (v for v in QUALITY_VARIANTS if v != "dense" and by(v)):
    buckets = {}
    for b in dense[0]["val"]:
      d = np.array([r["val"][b] for r in dense])
      h = np.array([r["val"][b] for r in by(v)])
      gap = h.mean() / d.mean() - 1.0
      spread = max((x.max() - x.min()) / d.mean() for x in (d, h))
      buckets[b] = {"dense": float(d.mean()), "hybrid": float(h.mean()), "gap": float(gap),
                    "seed_spread": float(spread),
                    "passes": bool(gap <= 0.02 or (spread > 0 and gap <= 2 * spread))}
    ok = all(x["passes"] for x in buckets.values())
    out[v] = {"buckets": buckets, "seeds": len(by(v)), "outcome":
              "confirmed" if ok else "not confirmed"}
    if not ok:
      outcome = "not confirmed"
  return {"hybrids": out, "outcome": outcome if out else "inconclusive"}


def plot_quality(runs: Sequence[dict], path: Path) -> Path:
  """Validation loss vs step in each position bucket, a line per run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = list(runs[0]["val"])
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
  styles = ["-", "--", ":", "-."]
  for r in runs:
    st = [e["step"] for e in r["evals"]]
    for ax, k in zip(np.atleast_1d(axes), keys):
      ax.plot(st, [e["val"][k] for e in r["evals"]], styles[r["seed"] % 4],
              color=COLORS.get(r["variant"]), marker="o", ms=2,
              label=f"{r['variant']} ({r['layers']}) seed {r['seed']}: {r['val'][k]:.3f}")
  for ax, k in zip(np.atleast_1d(axes), keys):
    ax.set(xlabel="training step", ylabel="validation cross-entropy (nats/token)",
           title=f"target positions {k}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def print_quality(results: dict) -> None:
  keys = list(results["runs"][0]["val"])
  print(f"\n{'variant':8} {'seed':>4} {'steps':>6} {'epochs':>6} "
        + " ".join(f"{'val ' + k:>11}" for k in keys) + f" {'ms/step':>8}")
  for r in results["runs"]:
    print(f"{r['variant']:8} {r['seed']:4d} {r['steps']:6d} {r['epochs']:6.2f} "
          + " ".join(f"{r['val'][k]:11.4f}" for k in keys) + f" {1e3 * r['step_s']:8.1f}")
  for v, x in results["verdict"]["hybrids"].items():
    print(f"  {v}: {x['outcome']}; " + "; ".join(
        f"{b} gap {100 * y['gap']:+.2f}% (seed spread {100 * y['seed_spread']:.2f}%)"
        for b, y in x["buckets"].items()))
  print(f"outcome: {results['verdict']['outcome']}")


# Command line -------------------------------------------------------------------------------------

def _previous(path: Path, done: set[tuple[str, int]]) -> list[dict]:
  """--append: the runs of an earlier results file that this call does not rerun."""
  if not path.exists():
    return []
  return [r for r in json.loads(path.read_text()).get("runs", [])
          if (r["variant"], r["seed"]) not in done]


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments.s2_claims",
                               description=__doc__.splitlines()[0])
  ap.add_argument("experiment", choices=("retrieval", "quality"))
  ap.add_argument("--quick", action="store_true", help="CPU sizes (tiny model, 256 tokens)")
  ap.add_argument("--task", choices=("passkey", "needle"), default="passkey",
                  help="retrieval: the synthetic passkey (default) or the long-context suite's "
                       "single needle in corpus text (results named s2_retrieval_needle_*)")
  ap.add_argument("--variants", default=None,
                  help="comma-separated, of " + ", ".join(VARIANTS) + " (default: retrieval all "
                       "four, quality " + ", ".join(QUALITY_VARIANTS) + ")")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  ap.add_argument("--max-steps", type=int, default=None,
                  help="steps per run (default 10000 retrieval, 2000 quality; quick: 40 / 30)")
  ap.add_argument("--eval-every", type=int, default=None,
                  help="steps between evaluations (default 500; quick 20 / 15)")
  ap.add_argument("--samples", type=int, default=None,
                  help="retrieval: examples per grid cell (default 64; quick 4)")
  ap.add_argument("--patience", type=int, default=2,
                  help="retrieval: stop after this many evaluations in a row at >= 99%% in "
                       "every cell")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="retrieval: wall seconds per run (checked at evaluations)")
  ap.add_argument("--jobs", type=int, default=1,
                  help="processes sharing the device, the variants split among them (small models "
                       "leave a GPU mostly idle; default 1)")
  ap.add_argument("--append", action="store_true",
                  help="keep the runs of the existing results file that this call does not rerun")
  ap.add_argument("--tag", default="", help="suffix of the results names")
  ap.add_argument("--out", default=None, help="results folder (default results/)")
  ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                  help="config overrides for every run")
  args = ap.parse_args(argv)
  retrieval = args.experiment == "retrieval"
  names = (args.variants.split(",") if args.variants
           else list(VARIANTS if retrieval else QUALITY_VARIANTS))
  unknown = set(names) - set(VARIANTS)
  if unknown:
    ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
  for k in ("max_steps", "eval_every", "samples", "budget_s"):
    if getattr(args, k) is not None and getattr(args, k) <= 0:
      ap.error(f"--{k.replace('_', '-')} must be positive")
  if args.patience < 1:
    ap.error("--patience must be at least 1")
  if args.jobs < 1:
    ap.error("--jobs must be at least 1")
  quick = args.quick
  needle = retrieval and args.task == "needle"
  if retrieval:
    base = list(RETRIEVAL_QUICK if quick else RETRIEVAL_GPU)
    base += (NEEDLE_QUICK if quick else NEEDLE_GPU) if needle else []
  else:
    base = list(QUALITY_QUICK if quick else QUALITY_GPU)
  eval_every = args.eval_every or ((20 if retrieval else 15) if quick else
                                   (500 if retrieval else 250))
  base += [f"eval_every={eval_every}", *args.set]
  if args.max_steps:
    base.append(f"steps={args.max_steps}")
    warmup = load_config("s2_dense", [*base[:-1], *args.set]).warmup_steps
    if warmup >= args.max_steps:  # a short run keeps a tenth of its steps for warm-up
      base.append(f"warmup_steps={args.max_steps // 10}")
  out = Path(args.out or RESULTS_DIR)
  out.mkdir(parents=True, exist_ok=True)
  name = f"s2_{args.experiment}{'_needle' if needle else ''}{args.tag}"
  cfg0 = run_config(names[0], args.seeds[0], base, quick)
  seq = cfg0.seq_len
  extra: dict = {"quick": quick, "overrides": base, "s2_spec": QUICK_S2_SPEC if quick else S2_SPEC}
  if retrieval:
    lengths = [seq // 2, seq] if needle and quick else [seq // 8, seq // 4, seq // 2, seq]
    depths = [0.02, 0.25, 0.5, 0.75, 0.98]
    samples = args.samples or (4 if quick else 64)
    digits = 7 if needle else 2 if quick else 5
    extra.update(task=args.task, lengths=lengths, depths=depths, samples=samples, digits=digits,
                 train_lengths=[n for _, n in retrieval_shapes(seq, cfg0.batch_size,
                                                               min(lengths))],
                 depth_range=[0.02, 0.98], patience=args.patience, budget_s=args.budget_s)
  data = None
  if not retrieval or needle:
    from experiments.train import prepare_data
    data = prepare_data(cfg0, progress=not quick)  # with --jobs: cached here for the jobs
    extra["corpus"] = data.summary()
  jobs = min(args.jobs, len(names))
  fresh = _run_jobs(argv, names, jobs, out, name) if jobs > 1 else []
  backend = jax.default_backend()  # after the jobs: this process holds no device until now
  path = out / f"{name}_{backend}.json"
  runs = _previous(path, {(v, s) for v in names for s in args.seeds}) if args.append else []

  def save(runs: list[dict]) -> tuple[Path, list[Path]]:
    runs.sort(key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"])))
    verdict = (retrieval_verdict if retrieval else quality_verdict)(runs)
    if retrieval:
      plots = [plot_retrieval(runs, out / f"{name}_{backend}.png", args.task),
               plot_grid({f"{r['variant']} s{r['seed']} @{r['steps']}": r["final"]
                          for r in runs}, out / f"{name}_grids_{backend}.png",
                         title=f"{args.task} exact match at the end ({samples} per cell)")]
    else:
      plots = [plot_quality(runs, out / f"{name}_{backend}.png")]
    return write_results(name, {**extra, "jobs": jobs, "runs": runs, "verdict": verdict,
                                "plots": [p.name for p in plots]}, out), plots

  if jobs > 1:
    path, plots = save(runs + fresh)
  for seed in args.seeds if jobs == 1 else ():
    for v in names:
      print(f"=== {v} ({VARIANTS[v]}) seed {seed} ===", flush=True)
      if retrieval:
        row = train_retrieval(v, seed, base, quick=quick, eval_every=eval_every,
                              lengths=lengths, depths=depths, samples=samples, digits=digits,
                              patience=args.patience, budget_s=args.budget_s, task=args.task,
                              data=data)
      else:
        row = train_quality(v, seed, base, data, quick=quick)
      runs.append(row)
      path, plots = save(runs)  # rewritten after every run: a call cut short keeps what it did
  results = json.loads(path.read_text())
  (print_retrieval if retrieval else print_quality)(results)
  print(f"wrote {path} and {', '.join(str(p) for p in plots)}")
  return results


def _run_jobs(argv: list[str] | None, names: list[str], jobs: int, out: Path,
              name: str) -> list[dict]:
  """--jobs N: the variants split over N processes sharing the device (each with 1/N of its
  memory), every seed in each; returns the runs the jobs finished (a job that fails loses only
  its own runs). Their files are removed once read."""
  argv = list(sys.argv[1:] if argv is None else argv)
  drop = {"--jobs", "--variants", "--out", "--tag"}
  rest, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a.split("=")[0] in drop:
      skip = "=" not in a
    elif a != "--append":
      rest.append(a)
  parts = out / f".{name}_jobs"
  shutil.rmtree(parts, ignore_errors=True)
  env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / jobs:.3f}"}
  procs = []
  for k in range(jobs):
    group = names[k::jobs]
    print(f"job {k}: {', '.join(group)}", flush=True)
    procs.append(subprocess.Popen([sys.executable, "-m", "experiments.s2_claims", *rest,
                                   "--variants", ",".join(group), "--out", str(parts),
                                   "--tag", f"_job{k}"], env=env))
  codes = [p.wait() for p in procs]
  runs = []
  for f in sorted(parts.glob("*.json")):
    runs += json.loads(f.read_text())["runs"]
  if any(codes):
    print(f"jobs exited with {codes}; keeping the {len(runs)} runs they finished", flush=True)
  shutil.rmtree(parts, ignore_errors=True)
  if not runs:
    raise SystemExit("no job finished a run")
  return runs


if __name__ == "__main__":
  main()
