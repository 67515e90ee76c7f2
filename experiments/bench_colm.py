"""CoLM speed: train step of the chained models against the Transformer, and CoLM-Air's chain-1
prefill against the full-model prefill (paper: 2.0x for Air {16,16}, 4.2x for {8,8,8,8}).

    python -m experiments bench colm                      # GPU: base preset, bf16 (< 4 min, H200)
    python -m experiments bench colm --preset small --set n_layers=1,vocab_size=512 --batch 2 \\
        --seq 32 --prompts 64,128 --steps 2 --repeats 2 --out /tmp/colm_bench   # CPU smoke run

Train: the jit step (forward, backward, AdamW) of `base` with chains (1,), then (16,16) and
(8,8,8,8) with ffn_dim widened to the baseline's parameter count (experiments.colm_experiments
.match_ffn), then the same chains at the baseline's dims (fewer parameters). Prefill: one CoLM-Air
model per chain set, batch 1, bf16 weights and cache; `prefill_last` (all chains over the
prompt, LM head at the last token) against `air_prefill` (chain 1 over the prompt, then the last
token through all chains) at each prompt length: both produce the same cache and first-token
logits. Times are medians of host-timed, synchronised calls after a compile call. Items left
when --budget-s is spent are skipped and listed. Writes results/colm_train_<backend>.json and
results/colm_prefill_<backend>.json.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from experiments.results import write_results
from kvcache import init_cache
from kvcache.air import air_prefill, prefill_last

CHAIN_SETS = ((16, 16), (8, 8, 8, 8))


def air_model(preset: str, chains: tuple[int, ...], max_len: int, dtype: str, attn: str,
              overrides: dict | None = None):
  """(cfg, graphdef, params) of a randomly initialised CoLM-Air model (one compiled init)."""
  cfg = ModelConfig.preset(preset, **{**(overrides or {}), "chains": chains, "air": True,
                                      "max_seq_len": max_len, "dtype": dtype,
                                      "param_dtype": dtype, "attn_impl": attn})
  graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))[0]
  params = jax.jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))[1])()
  return cfg, graphdef, params


def bench_prefill(model, prompt: int, repeats: int) -> dict:
  """Full-model vs chain-1 prefill of a CoLM-Air model (air_model) on one prompt of `prompt`
  tokens, batch 1, cache of prompt + 16 entries."""
  cfg, graphdef, params = model
  chains, dtype = cfg.chains, cfg.dtype
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt)), jnp.int32)
  lengths = jnp.full((1,), prompt, jnp.int32)
  row = {"chains": list(chains), "prompt_tokens": prompt, "dtype": dtype,
         "params": cfg.num_params(), "chain1_params": cfg.num_params(1)}
  out = {}
  for name, fn in (("full", prefill_last), ("chain1", air_prefill)):
    # Fresh (donated) caches are allocated before each timed call, outside the timing.
    caches = [init_cache(cfg, 1, prompt + 16) for _ in range(repeats + 1)]
    jax.block_until_ready(caches)
    times = []
    for cache in caches:
      t0 = time.perf_counter()
      out[name], cache = fn(graphdef, params, tokens, lengths, cache)
      jax.block_until_ready((out[name], cache))
      times.append(time.perf_counter() - t0)
      del cache
    row[f"{name}_ms"] = 1e3 * float(np.median(times[1:]))
    row[f"{name}_compile_s"] = times[0]
    del caches
  row["speedup"] = row["full_ms"] / row["chain1_ms"]
  # Model FLOPs of each path and attention's share of them: the speed-up's ceiling is set by
  # how much of the full prefill chain 1 leaves out (its attention share grows with the prompt).
  for name, (k, kv) in (("full", (None, None)), ("chain1", (1, cfg.num_chains))):
    matmul, attn = cfg.prefill_flops(prompt, k, kv)
    row[f"{name}_tflop"] = (matmul + attn) / 1e12
    row[f"{name}_attn_share"] = attn / (matmul + attn)
  row["flop_ratio"] = row["full_tflop"] / row["chain1_tflop"]
  # Same first-token logits (bf16 rounding apart): the two paths compute the same thing.
  a, b = np.asarray(out["full"], np.float32), np.asarray(out["chain1"], np.float32)
  row["logits_max_abs_diff"] = float(np.max(np.abs(a - b)))
  row["same_argmax"] = bool(np.all(a.argmax(-1) == b.argmax(-1)))
  return row


def train_variants(preset: str, overrides: dict) -> list[tuple[str, tuple[int, ...], dict]]:
  """(label, chains, ModelConfig overrides): the baseline, parameter-matched CoLM, equal-dims."""
  from experiments.colm_experiments import match_ffn
  base = ModelConfig.preset(preset, **overrides)
  out = [("baseline", (1,), dict(overrides))]
  for chains in CHAIN_SETS:
    try:
      m = match_ffn(base.replace(chains=chains), base.num_params(), multiple=64 if
                    preset in ("base", "large") else 1)
    except ValueError:
      continue
    out.append(("param-matched", chains, {**overrides, "ffn_dim": m.ffn_dim}))
  out += [("equal-dims", chains, dict(overrides)) for chains in CHAIN_SETS]
  return out


def _parse_set(text: str) -> dict:
  """'n_layers=1,vocab_size=512' -> {'n_layers': 1, 'vocab_size': 512} (ints, floats, strings)."""
  out = {}
  for item in filter(None, text.split(",")):
    key, _, val = item.partition("=")
    for conv in (int, float, str):
      try:
        out[key.strip()] = conv(val)
        break
      except ValueError:
        continue
  return out


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench colm")
  ap.add_argument("--preset", default="base")
  ap.add_argument("--set", default="", help="ModelConfig overrides, e.g. n_layers=1,d_model=64")
  ap.add_argument("--batch", type=int, default=32, help="train batch")
  ap.add_argument("--seq", type=int, default=1024, help="train sequence length")
  ap.add_argument("--steps", type=int, default=8, help="timed train steps")
  ap.add_argument("--prompts", default="4096,16384,32768,65536,131072,262144",
                  help="prefill prompt lengths")
  ap.add_argument("--repeats", type=int, default=5, help="timed prefill calls (3 past 64K)")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--attn", default="auto")
  ap.add_argument("--budget-s", type=float, default=150.0,
                  help="skip the items left once this much time has passed")
  ap.add_argument("--no-train", action="store_true")
  ap.add_argument("--no-prefill", action="store_true")
  ap.add_argument("--out", default=None, help="results folder (default results/)")
  ap.add_argument("--name", default="colm")
  args = ap.parse_args(argv)
  from experiments.bench_train import time_train_step
  overrides = _parse_set(args.set)
  t_start = time.perf_counter()
  train_rows, prefill_rows, skipped = [], [], []

  def over_budget(item: str) -> bool:
    if time.perf_counter() - t_start > args.budget_s:
      skipped.append(item)
      print(f"skipped (budget): {item}", flush=True)
      return True
    return False

  # Order: what the claims need first (baseline, matched CoLM, Air prefill), extras last.
  variants = [] if args.no_train else train_variants(args.preset, overrides)
  first_train = [v for v in variants if v[0] != "equal-dims"]
  extra_train = [v for v in variants if v[0] == "equal-dims"]

  def run_train(items):
    for label, chains, over in items:
      if over_budget(f"train {label} {chains}"):
        continue
      try:
        r = time_train_step(args.preset, chains, args.batch, args.seq, args.steps, 2, args.dtype,
                            args.attn, overrides=over)
      except ValueError as e:  # a chain set the preset's head counts cannot split
        print(f"train {label} {chains}: {e}")
        continue
      r["variant"] = label
      r["ffn_dim"] = ModelConfig.preset(args.preset, **over).ffn_dim
      train_rows.append(r)
      print(f"train {label:13} chains={chains}: {r['params'] / 1e6:.1f}M params, "
            f"{r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s", flush=True)

  run_train(first_train)
  prompts = [] if args.no_prefill else [int(p) for p in args.prompts.split(",") if p]
  for chains in CHAIN_SETS:
    if not prompts or over_budget(f"prefill {chains}"):
      continue
    try:
      model = air_model(args.preset, chains, max(prompts) + 16, args.dtype, args.attn, overrides)
    except ValueError as e:  # a chain set the preset's head counts cannot split
      print(f"prefill {chains}: {e}")
      continue
    for prompt in prompts:
      if over_budget(f"prefill {chains} {prompt}"):
        continue
      r = bench_prefill(model, prompt, args.repeats if prompt <= 65536 else min(args.repeats, 3))
      prefill_rows.append(r)
      print(f"prefill Air {str(chains):14} {prompt:6d} tokens: full {r['full_ms']:.2f} ms, "
            f"chain-1 {r['chain1_ms']:.2f} ms, {r['speedup']:.2f}x (FLOP ratio "
            f"{r['flop_ratio']:.2f}x; attention {r['full_attn_share']:.0%} / "
            f"{r['chain1_attn_share']:.0%} of the FLOPs)", flush=True)
  run_train(extra_train)

  base_ms = next((r["step_ms"] for r in train_rows if r["variant"] == "baseline"), None)
  for r in train_rows:
    r["step_ratio_vs_baseline"] = r["step_ms"] / base_ms if base_ms else None
  common = {"preset": args.preset, "overrides": overrides, "dtype": args.dtype,
            "skipped": skipped, "wall_s": time.perf_counter() - t_start}
  paths = [write_results(f"{args.name}_train", {
      **common, "train_batch": args.batch, "train_seq": args.seq,
      "rows": [{"variant": r["variant"], "chains": r["chains"], "params": r["params"],
                "ffn_dim": r.get("ffn_dim"), "step_ms": r["step_ms"],
                "tokens_per_s": r["tokens_per_s"], "vs_baseline": r["step_ratio_vs_baseline"],
                "compile_s": r["compile_s"]} for r in train_rows],
      "details": train_rows}, args.out)] if train_rows else []
  if prefill_rows:
    paths.append(write_results(f"{args.name}_prefill", {
        **common, "batch": 1, "rows": prefill_rows}, args.out))
  print(f"\n{'train step':16} {'chains':14} {'params':>8} {'ms/step':>9} {'vs (1,)':>8}")
  for r in train_rows:
    ratio = r["step_ratio_vs_baseline"]
    print(f"{r['variant']:16} {str(tuple(r['chains'])):14} {r['params'] / 1e6:7.1f}M "
          f"{r['step_ms']:9.1f} {'' if ratio is None else f'{ratio:7.2f}x':>8}")
  print(f"\n{'Air prefill':16} {'chains':14} {'tokens':>8} {'full ms':>9} {'chain-1 ms':>10} "
        f"{'speed-up':>9} {'FLOP ratio':>10} {'attn full':>9} {'attn ch-1':>9}")
  for r in prefill_rows:
    print(f"{'':16} {str(tuple(r['chains'])):14} {r['prompt_tokens']:8d} {r['full_ms']:9.2f} "
          f"{r['chain1_ms']:10.2f} {r['speedup']:8.2f}x {r['flop_ratio']:9.2f}x "
          f"{r['full_attn_share']:9.0%} {r['chain1_attn_share']:9.0%}")
  if skipped:
    print(f"skipped (over --budget-s {args.budget_s:.0f}): {', '.join(skipped)}")
  print(f"wrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - t_start:.0f} s)")
  return {"train": train_rows, "prefill": prefill_rows, "paths": [str(p) for p in paths]}


if __name__ == "__main__":
  main()
