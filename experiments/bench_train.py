"""Training throughput and model FLOPs utilisation of the jit train step.

    python -m experiments bench train                       # base preset, bf16 (GPU sizes)
    python -m experiments bench train --preset small --batch 8 --seq 128 --steps 5   # CPU

Times the real step (forward, backward, AdamW update) on random tokens, after compile and
warm-up, and writes results/train_<backend>.json with tokens/s and MFU against --peak-tflops.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from experiments.config import ModelSpec, TrainConfig
from experiments.results import pct, trace_to, write_results
from experiments.train import Trainer


def time_train_step(preset: str, chains: tuple[int, ...], batch: int, seq: int, steps: int,
                    warmup: int, dtype: str, attn: str, overrides: dict | None = None,
                    breakdown: bool = False, profile: str | None = None) -> dict:
  """Median step time of `steps` timed steps after `warmup` (each step synchronised)."""
  spec = ModelSpec(preset=preset, chains=list(chains), dtype=dtype, attn_impl=attn,
                   max_seq_len=seq, **(overrides or {}))
  cfg = TrainConfig(model=spec, batch_size=batch, seq_len=seq, steps=1000, warmup_steps=10)
  trainer = Trainer(cfg)
  mc = trainer.model_cfg
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, mc.vocab_size, (batch, seq + 1), dtype=np.int32) for _ in range(4)]
  t0 = time.perf_counter()
  state, m = trainer.step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = trainer.step(state, batches[i % 4])
  jax.block_until_ready((state.params, m))
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, m = trainer.step(state, batches[i % 4])
    jax.block_until_ready((state.params, m))
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  tokens = batch * seq
  if profile:
    with trace_to(profile):
      for i in range(3):
        state, m = trainer.step(state, batches[i % 4])
      jax.block_until_ready((state.params, m))
  parts = {}
  if breakdown:  # where the step's time goes: forward loss alone, forward + backward
    b = trainer.put_batch(batches[0])
    fwd = jax.jit(trainer.loss_fn)
    grad = jax.jit(jax.value_and_grad(trainer.loss_fn))
    for name, fn in (("forward_ms", fwd), ("forward_backward_ms", grad)):
      jax.block_until_ready(fn(state.params, b))
      ts = []
      for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state.params, b))
        ts.append(time.perf_counter() - t0)
      parts[name] = 1e3 * float(np.median(ts))
  flops = mc.flops_per_token(seq) * tokens
  return {"preset": preset, "chains": list(chains), "batch": batch, "seq_len": seq,
          "dtype": dtype, "attn_impl": attn, "params": mc.num_params(),
          "compile_s": compile_s, "step_ms": 1e3 * step_s,
          "step_ms_min": 1e3 * float(np.min(times)), "tokens_per_s": tokens / step_s,
          "model_tflops_per_s": flops / step_s / 1e12, "loss_last": float(m["loss"]), **parts}


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench train")
  ap.add_argument("--preset", default="base")
  ap.add_argument("--chains", default="1", help="comma-separated chain sets, ';' between variants")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--attn", default="auto")
  ap.add_argument("--peak-tflops", type=float, default=989.0,
                  help="dense bf16 peak for MFU (H100/H200 SXM datasheet)")
  ap.add_argument("--breakdown", action="store_true", help="also time forward and backward")
  ap.add_argument("--profile", default=None,
                  help="write a profiler trace (.xplane.pb) of 3 steps of the first variant here")
  ap.add_argument("--out", default=None, help="results folder (default results/)")
  ap.add_argument("--name", default="train")
  args = ap.parse_args(argv)
  rows = []
  for variant in args.chains.split(";"):
    chains = tuple(int(c) for c in variant.split(","))
    r = time_train_step(args.preset, chains, args.batch, args.seq, args.steps, args.warmup,
                        args.dtype, args.attn, breakdown=args.breakdown,
                        profile=args.profile if not rows else None)
    # MFU is defined against the GPU's dense bf16 peak; a CPU has no comparable figure here.
    r["mfu"] = r["model_tflops_per_s"] / args.peak_tflops if jax.default_backend() == "gpu" \
        else None
    rows.append(r)
    print(f"{args.preset} chains={chains}: {r['step_ms']:.1f} ms/step, "
          f"{r['tokens_per_s']:,.0f} tok/s, MFU {pct(r['mfu'])}", flush=True)
  path = write_results(args.name, {"peak_tflops": args.peak_tflops, "rows": rows}, args.out)
  print(f"\n{'preset':8} {'chains':12} {'batch':>5} {'seq':>5} {'ms/step':>9} {'tok/s':>10} "
        f"{'MFU':>6}")
  for r in rows:
    print(f"{r['preset']:8} {str(tuple(r['chains'])):12} {r['batch']:5d} {r['seq_len']:5d} "
          f"{r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} {pct(r['mfu']):>6}")
  print(f"wrote {path}")
  return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
  main()
