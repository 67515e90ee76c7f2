"""Offline batch inference: BatchLLM's scheduling against vLLM-style FCFS + LRU and SGLang-style
longest-prefix-match, all in one engine, one page budget, one run.

    python -m experiments bench batch                         # GPU: the base model, SGLang's
                                                              # generated-shared-prefix workload
    python -m experiments bench batch --workload micro --shuffle
    python -m experiments bench batch --quick                 # toy sizes (CPU)

Every scheduler serves the same requests (experiments.batch_workloads) with the same engine
settings (kvcache.engine.EngineConfig: KV page budget, token budget per step, prefill chunk) on
a randomly initialised model of the preset (greedy decoding runs every request to its
max_new_tokens; speed does not depend on the weights). Per scheduler: total and output tokens/s
(steps that compiled a new shape left out and reported apart as compile_s), prefill tokens
computed against the tree optimum, peak and time-integrated KV pages (held by running sequences,
and held in all, the LRU cache included), a step-time histogram; the greedy outputs of all
schedulers are compared. Writes results/batch_<workload>_<backend>.json and a PNG of KV pages
over time per scheduler.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from experiments import batch_workloads
from experiments.results import write_results
from kvcache.batchllm import BatchLLM
from kvcache.engine import FCFS, LPM, Engine, EngineConfig

SCHEDULERS = {
    "batchllm": BatchLLM,
    "batchllm_noreorder": lambda: BatchLLM(reorder=False),
    "fcfs_lru": FCFS,
    "lpm": LPM,
    "lpm_nofallback": lambda: LPM(fallback=None),
}


def spread_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
  """A Decoder with NumPy weights scaled so that logits spread out (greedy choices far from
  ties, so schedulers can be compared token for token), built abstractly (no eager init)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [1.0 + 0.5 * rng.standard_normal(x.shape) if x.ndim == 1
         else rng.standard_normal(x.shape) * (1.5 / np.sqrt(x.shape[0])) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(
      treedef, [jnp.asarray(y, x.dtype) for x, y in zip(leaves, new)]))


def _plot(traces: dict, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for name, (t, live, held) in traces.items():
    axes[0].plot(t, live, label=name)
    axes[1].plot(t, held, label=name)
  axes[0].set_title("KV pages held by running sequences")
  axes[1].set_title("KV pages held in all (prefix cache included)")
  for ax in axes:
    ax.set_xlabel("seconds (compiling steps left out)")
    ax.set_ylabel("pages")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench batch",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--workload", default="shared_prefix", choices=sorted(batch_workloads.WORKLOADS))
  ap.add_argument("--scale", type=float, default=1.0, help="token lengths times this")
  ap.add_argument("--shuffle", action="store_true", help="shuffled submission order")
  ap.add_argument("--schedulers", default="batchllm,fcfs_lru,lpm")
  ap.add_argument("--preset", default="base")
  ap.add_argument("--num-pages", type=int, default=4096)
  ap.add_argument("--page-size", type=int, default=64)
  ap.add_argument("--token-budget", type=int, default=8192)
  ap.add_argument("--chunk", type=int, default=2048)
  ap.add_argument("--max-running", type=int, default=256,
                  help="FCFS / LPM request cap (vLLM's max_num_seqs); BatchLLM is capped by pages")
  ap.add_argument("--batchllm-pages", default="1.0",
                  help="BatchLLM also at these fractions of --num-pages (e.g. 1.0,0.6,0.5): the "
                       "pages it needs to match the others' throughput")
  ap.add_argument("--repeat", type=int, default=1,
                  help="serve the workload this many times per scheduler and keep the last run "
                       "(2: every shape compiled before the measured run)")
  ap.add_argument("--dtype", default=None, help="model dtype (default: the preset's)")
  ap.add_argument("--quick", action="store_true", help="toy model and workload (CPU)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  if args.quick:
    cfg = ModelConfig.tiny(head_dim=16, max_seq_len=256, n_kv_heads=2, n_heads=4)
    kw = dict(groups=3, per_group=4, prefix=40, question=6, output=5) \
        if args.workload == "shared_prefix" else {}
    reqs = batch_workloads.scaled(args.workload, 0.02 if not kw else 1.0, vocab=cfg.vocab_size,
                                  **kw)
    ecfg = dict(num_pages=96, page_size=16, token_budget=128, chunk=64)
  else:
    cfg = getattr(ModelConfig, args.preset)(max_seq_len=8192,
                                            **({"dtype": args.dtype} if args.dtype else {}))
    reqs = batch_workloads.scaled(args.workload, args.scale, vocab=cfg.vocab_size)
    ecfg = dict(num_pages=args.num_pages, page_size=args.page_size,
                token_budget=args.token_budget, chunk=args.chunk)
  if args.shuffle:
    reqs = batch_workloads.shuffled(reqs, seed=0)
  model = spread_decoder(cfg, 0)
  rows, traces, outputs = [], {}, {}
  runs = []
  for name in args.schedulers.split(","):
    if name not in SCHEDULERS:
      raise SystemExit(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    fracs = [float(f) for f in args.batchllm_pages.split(",")] if name == "batchllm" else [1.0]
    runs += [(name, f) for f in fracs]
  for name, frac in runs:
    cap = None if name.startswith("batchllm") else args.max_running
    pages = int(ecfg["num_pages"] * frac)
    label = name if frac == 1.0 else f"{name}@{frac:g}"
    engine = Engine(model, EngineConfig(**{**ecfg, "num_pages": pages}, max_running=cap))
    for _ in range(max(1, args.repeat)):
      outs, m = engine.run(reqs, SCHEDULERS[name]())
    outputs[label] = [o.tokens for o in outs]
    rows.append({"scheduler": label, "max_running": cap, **ecfg, "num_pages": pages,
                 "repeat": args.repeat,
                 **m.summary(), "errors": sum(o.error is not None for o in outs)})
    keep = ~np.asarray(m.compiled, bool)
    t = np.cumsum(np.where(keep, m.step_s, 0.0))
    traces[label] = (t[keep], np.asarray(m.live_pages)[keep], np.asarray(m.pages)[keep])
  ref = next(iter(outputs.values()))
  for r in rows:
    r["same_tokens_as_first"] = float(np.mean([a == b for a, b in zip(outputs[r["scheduler"]],
                                                                      ref)]))
  by = {r["scheduler"]: r for r in rows}
  for b in rows:
    if b["scheduler"].startswith("batchllm"):
      for other in ("fcfs_lru", "lpm"):
        if other in by:
          o = by[other]
          b[f"speedup_over_{other}"] = b["total_tokens_per_s"] / o["total_tokens_per_s"]
          b[f"peak_live_pages_over_{other}"] = b["peak_live_pages"] / max(o["peak_live_pages"],
                                                                           1)
  tag = f"batch_{args.workload}" + ("_shuffled" if args.shuffle else "") + \
      (f"_{args.dtype}" if args.dtype else "") + ("_quick" if args.quick else "")
  info = {"workload": args.workload, "scale": args.scale, "shuffled": args.shuffle,
          "requests": len(reqs), "preset": "tiny" if args.quick else args.preset,
          "dtype": cfg.dtype, "weights": "random, spread (experiments.bench_batch.spread_decoder)",
          "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                    "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim}}
  path = write_results(tag, {**info, "rows": rows}, args.out)
  png = path.with_suffix(".png")
  _plot(traces, png)
  print(f"\n{'scheduler':>20} {'pages':>6} {'tok/s':>9} {'out tok/s':>9} {'compile s':>9} "
        f"{'prefill':>9} {'saving':>7} {'peak live':>9} {'peak all':>8} {'same':>5}")
  for r in rows:
    print(f"{r['scheduler']:>20} {r['num_pages']:6d} {r['total_tokens_per_s']:9.0f} "
          f"{r['output_tokens_per_s']:9.0f} "
          f"{r['compile_s']:9.1f} {r['prefill_tokens']:9d} "
          f"{100 * r['prefix_saving_of_optimum']:6.1f}% {r['peak_live_pages']:9d} "
          f"{r['peak_pages']:8d} {r['same_tokens_as_first']:5.2f}")
  print(f"wrote {path} and {png.name} ({jax.devices()[0].device_kind})")
  return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
  main()
