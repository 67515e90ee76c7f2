"""CoLM experiments: the standard Transformer vs CoLM vs CoLM-Air at equal parameters and tokens,
and progressive scaling (1 -> 2 chains) vs the 2-chain model trained from scratch.

    python -m experiments.colm_experiments --quick    # CPU, a few minutes: results/colm_*_cpu*
    python -m experiments.colm_experiments            # GPU: d_model 512, 8 layers, 1000 steps

Every variant is a config under experiments/configs/colm_*.yaml (their sizes are the --quick ones;
the GPU mode overrides the sizes and re-matches the FFN widths). How the variants are matched:
same vocabulary, d_model, heads, head_dim, depth, data and tokens (steps x batch x seq_len); a
chained layer holds fewer weights than a dense one (chain i reads D_<=i inputs), so each CoLM /
Air variant widens ffn_dim until its parameter count is the baseline's (`match_ffn`: within
0.1% on CPU, 0.5% on GPU where each chain's FFN share is a multiple of 16). CoLM variants train
with the multi-scale loss sum_k CE(chains 1..k) (weights 1), except the `c16x2_fullonly`
ablation. The progressive run trains one chain of width d_model/2 for half the steps, adds a
second (old chain frozen) and trains the other half: its final model has c16x2's shape, so
c16x2 is its from-scratch reference at the same total tokens.

Writes results/colm_experiments_<backend>.json (curves, per-scale validation loss and perplexity,
parameters, tokens, time) and plots colm_loss_<backend>.png, colm_scales_<backend>.png and
colm_progressive_<backend>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from colm.config import ModelConfig
from experiments.config import load_config
from experiments.results import RESULTS_DIR, write_results

VARIANTS = {  # name -> config file
    "baseline": "colm_baseline",
    "c16x2": "colm_c16x2",
    "c16x2_air": "colm_c16x2_air",
    "c8x4": "colm_c8x4",
    "c8x4_air": "colm_c8x4_air",
    "c16x2_fullonly": "colm_c16x2_fullonly",
    "progressive": "colm_progressive",
}
# GPU mode: a ~30M-parameter bf16 model (without its FFN re-matching) on 1000 x 32 x 512 tokens,
# the whole stdlib corpus (~12 MB, about 4 epochs: on the 4 MB of the CPU configs the validation
# loss of every variant turned up after ~7 epochs, H100 run of ce7ead0).
GPU_MODEL = dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64,
                 ffn_dim=1536, max_seq_len=512, dtype="bfloat16")
GPU_RUN = {"steps": 1000, "batch_size": 32, "seq_len": 512, "warmup_steps": 50, "eval_every": 50,
           "eval_batches": 16, "save_every": 250, "log_every": 25, "lr": 1.5e-3,
           "data.max_bytes": "null"}


def match_ffn(cfg: ModelConfig, target: int, multiple: int = 1) -> ModelConfig:
  """cfg with the ffn_dim whose parameter count is closest to `target` (each chain's FFN share a
  multiple of `multiple`)."""
  unit = sum(cfg.chains) // math.gcd(*cfg.chains) * multiple
  c0 = cfg.replace(ffn_dim=unit)
  per_unit = cfg.replace(ffn_dim=2 * unit).num_params() - c0.num_params()
  guess = max(1, round((target - c0.num_params()) / per_unit) + 1)
  cands = [cfg.replace(ffn_dim=unit * m) for m in range(max(1, guess - 2), guess + 3)]
  return min(cands, key=lambda c: abs(c.num_params() - target))


def _overrides(model: dict, run: dict) -> list[str]:
  return [f"model.{k}={v}" for k, v in model.items()] + [f"{k}={v}" for k, v in run.items()]


def gpu_run(steps: int | None = None) -> dict:
  """GPU_RUN, or a shorter run of `steps` steps with warm-up, evaluation and saving scaled."""
  if not steps:
    return dict(GPU_RUN)
  return dict(GPU_RUN, steps=steps, warmup_steps=max(1, steps // 20),
              eval_every=max(1, steps // 16), save_every=max(1, steps // 4))


def variant_config(name: str, quick: bool, out_dir: Path, steps: int | None = None):
  """The TrainConfig of a variant: the YAML as it is (--quick), or at GPU sizes, FFN re-matched
  (`steps` shortens the GPU run)."""
  base = [f"out_dir={out_dir}", "max_minutes=0"]
  if quick:
    return load_config(VARIANTS[name], base)
  run = gpu_run(steps)
  target = load_config(VARIANTS["baseline"], base + _overrides(GPU_MODEL, run))
  target_params = target.model_config().num_params()
  if name == "baseline":
    return target
  if name == "progressive":  # stage 0: half of c16x2 (width, heads, FFN); then + a chain
    full = variant_config("c16x2", quick, out_dir, steps).model_config()
    half = dict(GPU_MODEL, d_model=full.d_model // 2, n_heads=full.n_heads // 2,
                n_kv_heads=full.n_kv_heads // 2, ffn_dim=full.ffn_dim // 2)
    run = dict(run, stages=f"[{{steps: {run['steps'] // 2}}}, {{add_chain: "
                           f"{full.d_model // 2}, steps: {run['steps'] // 2}}}]")
    return load_config(VARIANTS[name], base + _overrides(half, run))
  cfg = load_config(VARIANTS[name], base + _overrides(GPU_MODEL, run))
  ffn = match_ffn(cfg.model_config(), target_params, multiple=16).ffn_dim
  return load_config(VARIANTS[name], base + _overrides(dict(GPU_MODEL, ffn_dim=ffn), run))


def _rows(path: Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def read_curves(run_dir: Path, cfg) -> dict:
  """Train loss and validation curves of a run (a progressive run's stages joined, steps offset)."""
  dirs = [run_dir / f"stage{s}" for s in range(len(cfg.stages))] if cfg.stages else [run_dir]
  offsets = [sum(s.steps for s in cfg.stages[:i]) for i in range(len(dirs))] if cfg.stages \
      else [0]
  train, val, wall = [], [], 0.0
  for d, off in zip(dirs, offsets):
    rows = _rows(d / "metrics.jsonl")
    wall += max((r.get("elapsed_s", 0.0) for r in rows), default=0.0)
    for r in rows:
      if "loss" in r:
        train.append([r["step"] + off, r["loss"]])
      if "val_loss" in r:
        val.append({"step": r["step"] + off, "val_loss": r["val_loss"],
                    "val_loss_scales": r.get("val_loss_scales", [r["val_loss"]])})
  return {"train": train, "val": val, "train_wall_s": wall}


def run_variant(name: str, quick: bool, out_dir: Path, progress: bool,
                steps: int | None = None) -> dict:
  from experiments.train import train
  cfg = variant_config(name, quick, out_dir, steps)
  mc = cfg.model_config()
  train(cfg, progress=progress)
  curves = read_curves(out_dir / cfg.name, cfg)
  last = curves["val"][-1]
  if cfg.stages:  # the final (expanded) model
    from experiments.progressive import stage_configs
    mc = stage_configs(cfg)[-1].model_config()
  scales = last["val_loss_scales"]
  return {
      "name": name, "config": VARIANTS[name], "chains": list(mc.chains), "air": mc.air,
      "chain_dims": list(mc.chain_dims), "ffn_dim": mc.ffn_dim, "params": mc.num_params(),
      "params_per_scale": [mc.num_params(k) for k in range(1, mc.num_chains + 1)],
      "scale_weights": cfg.scale_weights,
      "stages": [{"add_chain": s.add_chain, "steps": s.steps} for s in cfg.stages],
      "tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "steps": cfg.steps,
      "val_loss": scales[-1], "val_ppl": math.exp(scales[-1]),
      "val_loss_scales": scales, "val_ppl_scales": [math.exp(v) for v in scales],
      "wall_s": curves.pop("train_wall_s"), "curves": curves,
  }


def _finish(fig, ax, path, xlabel: str, ylabel: str, title: str, logy: bool = False):
  """Labels, grid and legend of one experiment plot; saves it to path and closes it."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path


def plot(results: dict, backend: str, out: Path) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = results["variants"]
  paths = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    if r["name"] == "progressive":
      continue
    v = r["curves"]["val"]
    ax.plot([p["step"] for p in v], [p["val_loss"] for p in v], "o-", ms=3,
            label=f"{r['name']} ({r['params'] / 1e6:.2f}M)")
  paths.append(_finish(fig, ax, out / f"colm_loss_{backend}.png", "step (equal tokens per step)",
                       "validation cross-entropy, full model",
                       f"CoLM vs Transformer at equal parameters ({backend})"))

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    if len(r["chains"]) > 1:
      fr = [sum(r["chain_dims"][:k + 1]) / sum(r["chain_dims"]) for k in range(len(r["chains"]))]
      ax.plot(fr, r["val_ppl_scales"], "o-", label=r["name"])
  base = next((r for r in rows if r["name"] == "baseline"), None)
  if base:
    ax.axhline(base["val_ppl"], color="k", ls="--", lw=1, label="baseline (full)")
  paths.append(_finish(fig, ax, out / f"colm_scales_{backend}.png",
                       "scale: width of chains 1..k / d_model", "validation perplexity",
                       f"Nested sub-models: perplexity per scale ({backend})", logy=True))

  prog = next((r for r in rows if r["name"] == "progressive"), None)
  scratch = next((r for r in rows if r["name"] == "c16x2"), None)
  if prog and scratch:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, lab in ((scratch, "2 chains from scratch"), (prog, "progressive 1 -> 2 chains")):
      v = r["curves"]["val"]
      ax.plot([p["step"] for p in v], [p["val_loss"] for p in v], "o-", ms=3, label=lab)
    ax.axvline(prog["stages"][0]["steps"], color="gray", ls=":", lw=1)
    paths.append(_finish(fig, ax, out / f"colm_progressive_{backend}.png",
                         "step (equal tokens per step)", "validation cross-entropy, current model",
                         f"Progressive chain scaling vs scratch ({backend})"))
  return paths


def write_all(rows: list[dict], quick: bool, backend: str, out: str | None):
  """Results JSON and plots of the variants trained so far."""
  summary = [{"variant": r["name"], "chains": r["chains"], "air": r["air"], "params": r["params"],
              "tokens": r["tokens"], "val_loss": r["val_loss"], "val_ppl": r["val_ppl"],
              "val_ppl_per_scale": [round(p, 2) for p in r["val_ppl_scales"]],
              "wall_s": r["wall_s"]} for r in rows]
  results = {"mode": "quick" if quick else "full", "rows": summary, "variants": rows,
             "matching": "equal vocab, d_model, heads, head_dim, depth, data and tokens; ffn_dim "
                         "widened per CoLM/Air variant to the baseline's parameter count"}
  path = write_results("colm_experiments", results, out)
  plots = plot(results, backend, Path(out or RESULTS_DIR))
  return results, path, plots


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments.colm_experiments")
  ap.add_argument("--quick", action="store_true", help="CPU sizes (the YAMLs as written)")
  ap.add_argument("--only", default="", help="comma-separated variant names (default all)")
  ap.add_argument("--runs", default="runs/colm_exp", help="run folders (reruns resume)")
  ap.add_argument("--fresh", action="store_true", help="delete the run folders first")
  ap.add_argument("--out", default=None, help="results folder (default results/)")
  ap.add_argument("--no-progress", action="store_true")
  ap.add_argument("--steps", type=int, default=None,
                  help=f"GPU sizes only: steps per variant (default {GPU_RUN['steps']})")
  args = ap.parse_args(argv)
  if args.steps and args.quick:
    ap.error("--steps applies to the GPU sizes; --quick runs the YAMLs as written")
  import jax
  backend = jax.default_backend()
  out_dir = Path(args.runs) / ("quick" if args.quick else f"full{args.steps or ''}")
  if args.fresh and out_dir.exists():
    shutil.rmtree(out_dir)
  names = [n for n in args.only.split(",") if n] or list(VARIANTS)
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
  rows = []
  for n in names:
    print(f"=== {n} ===", flush=True)
    rows.append(run_variant(n, args.quick, out_dir, not args.no_progress, args.steps))
    # Rewritten after every variant, so a run cut short keeps what it finished.
    results, path, plots = write_all(rows, args.quick, backend, args.out)
  print(f"\n{'variant':16} {'chains':14} {'air':>4} {'params':>8} {'tokens':>9} "
        f"{'val ppl per scale (chains 1..k)':>34} {'wall s':>7}")
  for r in rows:
    ppl = " ".join(f"{p:7.2f}" for p in r["val_ppl_scales"])
    print(f"{r['name']:16} {str(tuple(r['chains'])):14} {str(r['air'])[0]:>4} "
          f"{r['params'] / 1e6:7.3f}M {r['tokens']:9d} {ppl:>34} {r['wall_s']:7.0f}")
  print(f"wrote {path} and {', '.join(str(p) for p in plots)}")
  return results


if __name__ == "__main__":
  main()
