"""S2-Attention experiments: dense vs S2 (stride 8 / 16, with and without a dense layer) at equal
parameters and tokens, trained on the embedded corpus plus the passkey task.

    python -m experiments.s2_experiments --quick          # CPU: tiny widths, 256 tokens, minutes
    python -m experiments.s2_experiments                  # the configs as written (GPU sizes)
    python -m experiments.s2_experiments --configs s2_dense s2_v8 --steps 500

Each step trains on a batch of corpus windows (next-token loss) and a batch of synthetic passkey
sequences (loss on the answer tokens only). Recorded per config: train / validation loss curves,
the passkey depth x length accuracy grid (exact match, teacher-forced), seconds per step.
Writes results/s2_experiments_<backend>.json, s2_loss_<backend>.png, s2_passkey_<backend>.png
(`--tag` appends to the names).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.config import load_config
from experiments.results import RESULTS_DIR, write_results
from experiments.tasks import PasskeyTask, evaluate_grid, model_scorer, plot_grid

CONFIGS = ("s2_dense", "s2_v8", "s2_v16", "s2_v8_hybrid", "s2_v16_hybrid")
# CPU sizes (two shared cores): 8 heads of width 8, so in quick mode stride 16 is only half
# covered by the heads' shards (the GPU configs have 16 heads and cover it).
QUICK = ["model.d_model=64", "model.n_heads=8", "model.n_kv_heads=4", "model.head_dim=8",
         "model.ffn_dim=176", "model.vocab_size=2048", "model.max_seq_len=256",
         "model.dtype=float32", "seq_len=256", "batch_size=4", "steps=120", "warmup_steps=12",
         "lr=4e-3", "eval_every=40", "eval_batches=2", "data.max_bytes=4000000"]
QUICK_S2 = dict(block_size=16, local_blocks=2)  # 32-token window, 16 blocks of context


def quick_layer_attn(layer_attn) -> list[str]:
  """The configs' S2 specs with CPU-sized blocks (same strides)."""
  import dataclasses

  from s2attn.attention import s2_options_from_spec
  from s2attn.hybrid import s2_spec
  out = []
  for spec in layer_attn:
    o = s2_options_from_spec(spec)
    out.append(spec if o is None else s2_spec(dataclasses.replace(o.pattern, **QUICK_S2),
                                              per_kv_head=o.per_kv_head))
  return out


def _ce(logits, targets, weights=None):
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  if weights is None:
    return jnp.mean(nll)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def task_shapes(seq: int, task_batch: int, mixed: bool) -> list[tuple[int, int]]:
  """(batch, length) of the passkey batches, cycled over the steps: all at `seq`, or (mixed)
  seq/8, seq/4, seq/2 and seq with the batch scaled to the same number of tokens, so that the
  short needle-to-question distances that make the copy easy to find come often."""
  if not mixed:
    return [(task_batch, seq)]
  return [(max(1, task_batch * seq // n), n) for n in (seq // 8, seq // 4, seq // 2, seq)
          if n >= 32]


def run_config(name: str, overrides: list[str], *, data, task_batch: int, task_weight: float,
               grid_lengths, grid_depths, grid_samples: int, digits: int = 3, seed: int = 0,
               mixed_lengths: bool = False) -> dict:
  """Trains one config (corpus + passkey) and evaluates it; returns its results row."""
  from experiments.train import Trainer
  cfg = load_config(name, overrides)
  trainer = Trainer(cfg)
  mc = trainer.model_cfg
  codec, tx = trainer.codec, trainer.tx
  state = trainer.init_state()
  params, opt_state = state.params, state.opt_state
  task = PasskeyTask.synthetic(mc.vocab_size, value_digits=digits)

  def loss_fn(params, lm, tt, w):
    model = codec.merge(params)
    lm_loss = _ce(model(lm[:, :-1], logits_dtype=model.cfg.dtype), lm[:, 1:])
    task_loss = _ce(model(tt[:, :-1], logits_dtype=model.cfg.dtype), tt[:, 1:], w)
    return lm_loss + task_weight * task_loss, (lm_loss, task_loss)

  @jax.jit
  def step(params, opt_state, lm, tt, w):
    (_, (lm_loss, task_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, lm, tt, w)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, lm_loss, task_loss

  val_loss = jax.jit(lambda p, b: _ce(codec.merge(p)(b[:, :-1]), b[:, 1:]))
  rng = np.random.default_rng(seed)
  shapes = task_shapes(cfg.seq_len, task_batch, mixed_lengths)
  curve, times = [], []
  t_start = time.time()
  for s in range(cfg.steps):
    lm = data.batch("train", s, cfg.batch_size, cfg.seq_len, cfg.seed)
    tb, tl = shapes[s % len(shapes)]
    tt, w = task.batch(rng, tb, tl + 1)
    t0 = time.perf_counter()
    params, opt_state, lm_loss, task_loss = step(params, opt_state, lm, tt, w)
    lm_loss, task_loss = float(lm_loss), float(task_loss)
    times.append(time.perf_counter() - t0)
    row = {"step": s + 1, "loss": lm_loss, "task_loss": task_loss}
    if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
      row["val_loss"] = float(np.mean([float(val_loss(params, data.batch(
          "val", i, cfg.batch_size, cfg.seq_len, cfg.seed))) for i in range(cfg.eval_batches)]))
      print(f"  {name} step {s + 1}: loss {lm_loss:.3f} task {task_loss:.3f} "
            f"val {row['val_loss']:.3f} ({time.time() - t_start:.0f} s)", flush=True)
    curve.append(row)
  grid = evaluate_grid(model_scorer(trainer.model(params)), task, grid_lengths, grid_depths,
                       samples=grid_samples, seed=seed + 1)
  return {"config": name, "layer_attn": list(mc.layer_attn), "params": mc.num_params(),
          "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
          "task_tokens": cfg.steps * task_batch * cfg.seq_len,
          "step_s_median": float(np.median(times[1:])) if len(times) > 1 else times[0],
          "val_loss": curve[-1]["val_loss"], "curve": curve, "passkey": grid,
          "wall_s": time.time() - t_start}


def plot_losses(rows: list[dict], path: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  for r in rows:
    c = r["curve"]
    steps = [x["step"] for x in c]
    k = max(1, len(c) // 50)  # smooth the train curve with a running mean
    lm = np.convolve([x["loss"] for x in c], np.ones(k) / k, mode="valid")
    (line,) = a1.plot(steps[k - 1:], lm, label=f"{r['config']} (val {r['val_loss']:.3f})")
    v = [(x["step"], x["val_loss"]) for x in c if "val_loss" in x]
    a1.plot(*zip(*v), "o", color=line.get_color(), ms=3)
    t = np.convolve([x["task_loss"] for x in c], np.ones(k) / k, mode="valid")
    a2.plot(steps[k - 1:], t, color=line.get_color(), label=r["config"])
  a1.set(xlabel="step", ylabel="corpus cross-entropy (nats/token)", title="LM loss (dots: val)")
  a2.set(xlabel="step", ylabel="answer cross-entropy", title="passkey loss")
  for a in (a1, a2):
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_all(rows, args, common, task_batch, digits, samples):
  """Summary rows, results JSON and both plots of the configs trained so far."""
  dense = next((r for r in rows if r["config"] == "s2_dense"), None)
  summary = []
  for r in rows:
    s = {"config": r["config"], "val_loss": r["val_loss"], "passkey_mean": r["passkey"]["mean"],
         "step_s_median": r["step_s_median"]}
    if dense is not None:
      s["val_loss_vs_dense"] = r["val_loss"] / dense["val_loss"] - 1.0
      s["step_speedup_vs_dense"] = dense["step_s_median"] / r["step_s_median"]
    summary.append(s)
  backend = jax.default_backend()
  out = Path(args.out or RESULTS_DIR)
  out.mkdir(parents=True, exist_ok=True)
  loss_png = plot_losses(rows, out / f"s2_loss_{backend}{args.tag}.png")
  grid_png = plot_grid({r["config"]: r["passkey"] for r in rows},
                       out / f"s2_passkey_{backend}{args.tag}.png",
                       title=f"passkey retrieval, exact match ({samples} per cell)")
  note = ("CPU: S2 layers run the jnp reference (dense attention under the S2 mask), so step "
          "times measure machine load, not sparsity" if backend != "gpu" else "")
  path = write_results(f"s2_experiments{args.tag}", {
      "quick": args.quick, "note": note, "overrides": common, "task_batch": task_batch,
      "task_weight": args.task_weight, "mixed_lengths": args.mixed_lengths, "digits": digits,
      "summary": summary, "runs": rows,
      "plots": [loss_png.name, grid_png.name]}, out)
  return summary, path, loss_png, grid_png


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="CPU sizes (a few minutes on 2 cores)")
  ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--task-batch", type=int, default=None, help="passkey sequences per step")
  ap.add_argument("--task-weight", type=float, default=1.0)
  ap.add_argument("--digits", type=int, default=None, help="passkey value digits")
  ap.add_argument("--samples", type=int, default=None, help="passkey examples per grid cell")
  ap.add_argument("--mixed-lengths", action="store_true",
                  help="passkey batches cycle over seq/8 .. seq tokens (equal tokens per step)")
  ap.add_argument("--tag", default="", help="suffix of the results names")
  ap.add_argument("--out", default=None, help="results folder (default results/)")
  ap.add_argument("overrides", nargs="*", help="key=value config overrides for every config")
  args = ap.parse_args(argv)
  from experiments.train import prepare_data
  common = (QUICK if args.quick else []) + list(args.overrides)
  if args.steps:
    common += [f"steps={args.steps}", f"warmup_steps={max(1, args.steps // 10)}",
               f"eval_every={max(1, args.steps // 3)}"]
  first = load_config(args.configs[0], common)
  seq = first.seq_len
  task_batch = args.task_batch or (4 if args.quick else first.batch_size)
  digits = args.digits or (2 if args.quick else 5)
  lengths = [seq // 4, seq // 2, seq] if args.quick else [seq // 8, seq // 4, seq // 2, seq]
  depths = [0.0, 0.25, 0.5, 0.75, 1.0]
  samples = args.samples or (4 if args.quick else 32)
  data = prepare_data(first, progress=False)
  rows = []
  for name in args.configs:
    ov = list(common)
    if args.quick:
      ov.append("model.layer_attn=[" + ",".join(
          f"'{s}'" for s in quick_layer_attn(load_config(name, common).model.layer_attn)) + "]")
    print(f"{name}: training", flush=True)
    rows.append(run_config(name, ov, data=data, task_batch=task_batch,
                           task_weight=args.task_weight, grid_lengths=lengths,
                           grid_depths=depths, grid_samples=samples, digits=digits,
                           mixed_lengths=args.mixed_lengths))
    # Results are rewritten after every config, so a run cut short keeps what it finished.
    summary, path, loss_png, grid_png = write_all(rows, args, common, task_batch, digits, samples)
  print(json.dumps(summary, indent=1))
  print(f"wrote {path}, {loss_png}, {grid_png}")


if __name__ == "__main__":
  main()
