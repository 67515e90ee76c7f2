"""KV-cache compression on the long-context suite: methods x budgets x task families, query-aware
and query-agnostic, needle heatmaps, memory held, and decode speed at a long prompt.

    python -m experiments bench press --model runs/longctx        # GPU (the trained model)
    python -m experiments bench press --model runs/q --quick      # CPU: tiny suite, no speed run

The model is longctx_train's (`load_model`). Every method is a kvcache press applied after
prefill through the decode loop's compression hook (real per-layer / per-head budgets: the cache
it returns holds fewer slots); decoding is greedy, and the generation is scored with the suite's
exact scorers (experiments.longctx.score). WindowKV's task switch is the project's classifier
(experiments.task_classifier, trained on the suite's training split) or, with
--task-switch oracle, the true task type. Query-aware: the prompt ends with the question (inside
the observation window). Query-agnostic: the context alone is prefilled and compressed, then the
question is prefilled onto the compressed cache (generate(..., suffixes=)).

Sections (each timed; the file is rewritten after each, so a run cut short keeps what it did):
speed (decode tokens/s and cache bytes, full vs every method at --speed-budget, at
--speed-prompt tokens and batch --speed-batch), suite (query-aware), needle grid (full and each
method at --grid-budget), suite (query-agnostic). Writes results/press_<backend>.json and
press_scores_<backend>.png (score vs budget per task family), press_needle_<backend>.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import longctx
from experiments.results import RESULTS_DIR, write_results

METHODS = ("streamingllm", "h2o", "snapkv", "pyramidkv", "windowkv")
# H2O with its scores updated while decoding (slower: jnp attention); MPCache's static eviction
# scored per KV head instead of over all heads (an ablation).
EXTRA = ("h2o-decode", "mpcache-group")
BUDGETS = (0.5, 0.25, 0.12, 0.06)
ROOM = 128  # free slots per head after compression: the question (query-agnostic) and the answer


# MPCache (mpc.mpcache): static eviction alone, + the paper's two-level dynamic selection (50% of
# 32-token clusters, then 20% of 16-token children), + one level of 20% (what mpc.secure runs).
MPCACHE = {"mpcache": None, "mpcache-dyn": {"keep1": 0.5, "child": 16, "keep2": 0.2},
           "mpcache-dyn1": {"keep1": 0.2, "child": 0},
           # ablation: + the last 32 tokens always attended (Dynamic.recent)
           "mpcache-dyn-recent": {"keep1": 0.5, "child": 16, "keep2": 0.2, "recent": 32},
           # ablation: the same budgets, clusters ranked by their exact largest q . k (an oracle)
           "mpcache-dyn-exact": {"keep1": 0.5, "child": 16, "keep2": 0.2, "score": "exact"},
           # ablation: clusters ranked by Quest's upper bound of q . k from r_max / r_min
           "mpcache-dyn-upper": {"keep1": 0.5, "child": 16, "keep2": 0.2, "score": "upper"}}
MPCACHE_WINDOW = 512  # window queries scored; MPCache uses the last 20% of the prompt's (<= this)

OPTIONS: dict = {}  # method -> field overrides (--gamma, --beta), set by main
BATCH: list[int | None] = [None]  # examples per generate call (--batch; None: all), set by main


def make_press(method: str, budget: float | int, *, room: int = ROOM, task: str = "localization",
               bucket: int = 16):
  """The press of a method name (WindowKV: for the task type `task`), with OPTIONS applied."""
  from kvcache import H2O, PyramidKV, SnapKV, StreamingLLM, WindowKV
  classes = {"streamingllm": StreamingLLM, "h2o": H2O, "snapkv": SnapKV, "pyramidkv": PyramidKV}
  if method == "windowkv":
    return WindowKV.for_task(task, budget, room=room, bucket=bucket,
                             **OPTIONS.get(method, {}))
  if method == "h2o-decode":  # H2O as the paper runs it: scores accumulate while decoding
    return H2O(budget, room=room, bucket=bucket, decode=True, **OPTIONS.get("h2o", {}))
  if method == "mpcache-group":  # ablation: static eviction scored per KV head
    from mpc.mpcache import MPCache
    return MPCache(budget, window=MPCACHE_WINDOW, room=room, bucket=bucket,
                   **{**OPTIONS.get("mpcache", {}), "heads": "group"})
  if method in MPCACHE:
    from mpc.mpcache import Dynamic, MPCache
    dyn = MPCACHE[method]
    return MPCache(budget, window=MPCACHE_WINDOW, room=room, bucket=bucket,
                   dynamic=None if dyn is None else Dynamic(**dyn), **OPTIONS.get(method, {}))
  if method not in classes:
    raise ValueError(f"unknown method {method!r}; known: "
                     f"{', '.join(METHODS + EXTRA + tuple(MPCACHE))}")
  return classes[method](budget, room=room, bucket=bucket, **OPTIONS.get(method, {}))


def _encode(tok, text: str) -> list[int]:
  return tok.encode(text, add_special_tokens=False).ids


def run_examples(model, tok, examples, method: str | None, budget, *, query_aware: bool,
                 task_of, max_new: int, stop: int) -> dict:
  """Scores of `examples` under one method and budget (method None: the full cache)."""
  from kvcache import generate
  if query_aware:
    prompts = [_encode(tok, e.prompt()) for e in examples]
    suffixes = None
  else:
    ctx_q = [e.parts() for e in examples]
    prompts = [_encode(tok, c) for c, _ in ctx_q]
    suffixes = [_encode(tok, q) for _, q in ctx_q]
  groups: dict[str, list[int]] = {}
  for i, e in enumerate(examples):
    groups.setdefault(task_of(e) if method == "windowkv" else "all", []).append(i)
  texts = [""] * len(examples)
  held = []
  t0 = time.perf_counter()
  step = BATCH[0] or len(examples)
  chunks = [(task, idx[c:c + step]) for task, idx in groups.items()
            for c in range(0, len(idx), step)]
  for task, idx in chunks:
    comp = None if method is None else make_press(method, budget, task=task).compression()
    longest = max(len(prompts[i]) for i in idx) + (
        0 if suffixes is None else max(len(suffixes[i]) for i in idx))
    out, info = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new,
                         stop_tokens=[stop], compression=comp,
                         max_len=-(-(longest + max_new) // 64) * 64 + 64,
                         suffixes=None if suffixes is None else [suffixes[i] for i in idx],
                         return_info=True)
    cache = info["cache"]
    held.append((len(idx), cache.nbytes(include_positions=False) / cache.batch_size,
                 float(np.mean(cache.held_tokens()))))
    for i, ids in zip(idx, out):
      texts[i] = tok.decode([t for t in ids if t != stop])
  scores = [longctx.score(e, t) for e, t in zip(examples, texts)]
  n = sum(c for c, _, _ in held)
  return {"scores": scores, "by_family": longctx.by_family(examples, scores),
          "kv_bytes_per_seq": sum(c * b for c, b, _ in held) / n,
          "held_slots_per_head": sum(c * h for c, _, h in held) / n,
          "wall_s": time.perf_counter() - t0, "samples": [t[:80] for t in texts[:3]]}


def decode_speed(cfg, batch: int, prompt: int, new: int, presses: dict, repeats: int = 2
                 ) -> list[dict]:
  """Decode tokens/s after a random `prompt`-token prompt: the full cache, then each press."""
  from colm.model import Decoder
  from kvcache import SamplingConfig, apply_policy, decode_loop, init_cache, prefill
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (batch, prompt)), jnp.int32)
  lengths = jnp.full((batch,), prompt, jnp.int32)
  stops = jnp.zeros((0,), jnp.int32)
  rows = []
  for name, press in [("full", None)] + list(presses.items()):
    def run(press=press):
      if press is None:
        cache = init_cache(cfg, batch, prompt + new)
        logits, cache = prefill(graphdef, params, tokens, lengths, cache)
        t_c = 0.0
      else:
        comp = press.compression()
        cache = init_cache(cfg, batch, prompt)
        out = prefill(graphdef, params, tokens, lengths, cache, score_window=comp.window)
        logits, cache, scores = out if comp.window else (*out, None)
        jax.block_until_ready(cache)
        t = time.perf_counter()
        cache = apply_policy(comp.policy, cache, scores)
        jax.block_until_ready(cache)
        t_c = time.perf_counter() - t
      first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
      jax.block_until_ready((first, cache))
      nbytes = cache.nbytes(include_positions=False)
      t = time.perf_counter()
      out, n, cache = decode_loop(graphdef, params, first, cache, jax.random.key(0), stops,
                                  max_new_tokens=new, sampling=SamplingConfig())
      out.block_until_ready()
      return time.perf_counter() - t, int(n) - 1, nbytes, t_c
    run()  # compile
    res = [run() for _ in range(repeats)]
    dt = float(np.median([r[0] for r in res]))
    rows.append({"method": name, "decode_s": dt, "steps": res[0][1],
                 "tokens_per_s": batch * res[0][1] / dt, "kv_bytes": res[0][2],
                 "compress_s": float(np.median([r[3] for r in res]))})
    print(f"  speed {name:12} {rows[-1]['tokens_per_s']:10,.0f} tok/s  KV "
          f"{rows[-1]['kv_bytes'] / 2**20:8.1f} MiB", flush=True)
  full = rows[0]
  for r in rows:
    r["speedup_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
    r["kv_fraction"] = r["kv_bytes"] / full["kv_bytes"]
  return rows


def speed_section(trained_cfg, args, out: dict, save) -> None:
  """Fills out with the speed rows of each --speed-presets entry ('trained': trained_cfg's
  shapes), calling save() after each, so that a run cut short keeps the presets it timed."""
  from colm.config import ModelConfig
  for preset in args.speed_presets:
    mlen = args.speed_prompt + args.speed_new + 64
    cfg = (trained_cfg.replace(max_seq_len=mlen) if preset == "trained"
           else ModelConfig.preset(preset, max_seq_len=mlen))
    presses = {m: make_press(m, args.speed_budget, room=args.speed_new + 16, bucket=64)
               for m in args.methods}
    print(f"speed: {preset} ({cfg.num_params() / 1e6:.0f}M), batch {args.speed_batch}, "
          f"prompt {args.speed_prompt}, {args.speed_new} new tokens", flush=True)
    out[preset] = {"params": cfg.num_params(), "batch": args.speed_batch,
                   "prompt": args.speed_prompt, "new": args.speed_new,
                   "budget": args.speed_budget,
                   "rows": decode_speed(cfg, args.speed_batch, args.speed_prompt,
                                        args.speed_new, presses)}
    save()


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench press")
  ap.add_argument("--model", default=None,
                  help="a folder written by experiments.longctx_train (required but for "
                       "--sections speed, which times random weights of the shapes of "
                       "configs/longctx.yaml's model when no folder is given)")
  ap.add_argument("--quick", action="store_true", help="CPU: a small suite, no speed section")
  ap.add_argument("--methods", nargs="+", default=list(METHODS))
  ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
  ap.add_argument("--length", type=int, default=None, help="suite prompt length (default: the "
                  "model's longest trained length)")
  ap.add_argument("--n", type=int, default=None, help="examples per family (default 16; quick 2)")
  ap.add_argument("--max-new", type=int, default=64)
  ap.add_argument("--batch", type=int, default=None,
                  help="examples per generate call (default all; a CPU needs ~8 at 2K tokens)")
  ap.add_argument("--task-switch", choices=("classifier", "oracle"), default="classifier")
  ap.add_argument("--grid-lengths", type=int, nargs="+", default=None)
  ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
  ap.add_argument("--grid-n", type=int, default=None, help="needles per grid cell (default 8)")
  ap.add_argument("--grid-budget", type=float, default=0.12)
  ap.add_argument("--speed-budget", type=float, default=0.12)
  ap.add_argument("--speed-prompt", type=int, default=32768)
  ap.add_argument("--speed-batch", type=int, default=8)
  ap.add_argument("--speed-new", type=int, default=256)
  ap.add_argument("--speed-presets", nargs="*", default=["trained", "base"],
                  help="models of the speed section: 'trained' (the --model's shape) and presets")
  ap.add_argument("--sections", nargs="+", default=["speed", "aware", "grid", "agnostic"])
  ap.add_argument("--gamma", type=int, default=None, help="WindowKV's index-sharing group size "
                  "(default the paper's 4)")
  ap.add_argument("--lam", type=float, default=None, help="WindowKV's budget pyramid lambda "
                  "(default 14; 1 = equal budgets)")
  ap.add_argument("--beta", type=float, default=None, help="PyramidKV's beta (default 20)")
  ap.add_argument("--tau", type=float, default=None, help="MPCache's static threshold "
                  "(default 1e-3)")
  ap.add_argument("--mpcache-heads", choices=("all", "group"), default=None,
                  help='MPCache static score: "all" heads (the paper, default) or per KV "group"')
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None)
  ap.add_argument("--name", default="press")
  args = ap.parse_args(argv)
  OPTIONS.clear()
  if args.batch is not None and args.batch < 1:
    raise SystemExit(f"--batch must be >= 1, got {args.batch}")
  BATCH[0] = args.batch
  wk = {k: v for k, v in (("gamma", args.gamma), ("lam", args.lam)) if v is not None}
  if wk:
    OPTIONS["windowkv"] = wk
  if args.beta is not None:
    OPTIONS["pyramidkv"] = {"beta": args.beta}
  mp = {k: v for k, v in (("tau", args.tau), ("heads", args.mpcache_heads)) if v is not None}
  if mp:
    for m in MPCACHE:
      OPTIONS[m] = dict(mp)
  for m in args.methods:
    make_press(m, 0.5)  # unknown names: a one-line error first
  for b in args.budgets:
    if not 0 < b <= 1:
      raise SystemExit(f"budget {b} must be a ratio in (0, 1]")
  out_dir = Path(args.out) if args.out else RESULTS_DIR
  name = args.name
  res: dict = {}

  def save():
    res["wall_s"] = time.time() - t_start
    return write_results(name, res, out_dir)

  if args.model is None:  # the speed section alone: timing does not depend on the weights
    if set(args.sections) != {"speed"}:
      raise SystemExit("--model is required unless --sections speed")
    from experiments.config import load_config
    name = "press_speed" if args.name == "press" else args.name
    res.update({"model": None, "model_config": "configs/longctx.yaml (random weights)",
                "options": dict(OPTIONS), "methods": args.methods})
    t_start = time.time()
    res["speed"] = {}
    speed_section(load_config("longctx").model_config(), args, res["speed"], save)
    path = save()
    summary(res)
    print(f"wrote {path}")
    return res
  from experiments.longctx_train import load_model
  from experiments.task_classifier import TaskClassifier, oracle
  model, tok, info = load_model(args.model)
  from experiments.data import eot_token_id
  stop = eot_token_id(tok)
  trained = info.get("lengths") or [model.cfg.max_seq_len // 2]
  length = args.length or max(trained)
  n = args.n or (2 if args.quick else 16)
  backend = jax.default_backend()
  sections = [s for s in args.sections if not (args.quick and s == "speed")]
  res.update({"model": str(args.model), "model_info": info, "length": length, "n": n,
              "methods": args.methods, "budgets": args.budgets, "task_switch": args.task_switch,
              "room": ROOM, "max_new": args.max_new, "options": dict(OPTIONS),
              "batch": args.batch})
  t_start = time.time()

  if "speed" in sections:
    res["speed"] = {}
    speed_section(model.cfg, args, res["speed"], save)

  examples = longctx.suite([length], n, args.seed, tokenizer=tok)
  if args.task_switch == "oracle":
    task_of = oracle
  else:
    train = longctx.train_examples(14 * (2 if args.quick else 8), [length], args.seed,
                                   tokenizer=tok)
    clf = TaskClassifier.train(train)
    res["classifier_accuracy"] = clf.accuracy(examples)
    task_of = clf.predict

  def suite(mode: str) -> dict:
    aware = mode == "aware"
    rows = {"full": {"1.0": run_examples(model, tok, examples, None, None, query_aware=aware,
                                         task_of=task_of, max_new=args.max_new, stop=stop)}}
    full_bytes = rows["full"]["1.0"]["kv_bytes_per_seq"]
    print(f"{mode}: full {rows['full']['1.0']['by_family']['all']:.3f}", flush=True)
    for m in args.methods:
      rows[m] = {}
      for b in args.budgets:
        try:
          r = run_examples(model, tok, examples, m, b, query_aware=aware, task_of=task_of,
                           max_new=args.max_new, stop=stop)
        except ValueError as e:  # a budget below a method's window: recorded, not fatal
          rows[m][str(b)] = {"error": str(e)}
          continue
        r["kv_fraction"] = r["kv_bytes_per_seq"] / full_bytes
        rows[m][str(b)] = r
        print(f"  {mode} {m:12} {b:5.2f}: {r['by_family']['all']:.3f} (loc "
              f"{r['by_family'].get('localization', 0):.3f}, agg "
              f"{r['by_family'].get('aggregation', 0):.3f}), KV {r['kv_fraction']:.3f} "
              f"({time.time() - t_start:.0f} s)", flush=True)
    return rows

  if "aware" in sections:
    res["aware"] = suite("aware")
    save()
  if "grid" in sections:
    glens = args.grid_lengths or [x for x in trained if x >= 1024] or trained
    gn = args.grid_n or (2 if args.quick else 8)
    grid_ex = longctx.needle_grid(glens, args.depths, gn, args.seed, tokenizer=tok)
    res["grid"] = {}
    for m in [None] + args.methods:
      accs = []
      for ln in glens:
        exs = [e for e in grid_ex if e.target_length == ln]
        try:
          r = run_examples(model, tok, exs, m, None if m is None else args.grid_budget,
                           query_aware=True, task_of=task_of, max_new=16, stop=stop)
          accs += r["scores"]
        except ValueError as e:
          accs += [float("nan")] * len(exs)
          res["grid"].setdefault("errors", []).append(f"{m} at {ln}: {e}")
      res["grid"][m or "full"] = longctx.grid_accuracy(grid_ex, accs)
      print(f"  grid {m or 'full':12}: {res['grid'][m or 'full']['mean']:.3f}", flush=True)
    res["grid_budget"] = args.grid_budget
    save()
  if "agnostic" in sections:
    res["agnostic"] = suite("agnostic")
    save()
  res["plots"] = plots(res, out_dir, backend, args.name)
  path = save()
  summary(res)
  print(f"wrote {path}")
  return res


def summary(res: dict) -> None:
  for mode in ("aware", "agnostic"):
    if mode not in res:
      continue
    rows = res[mode]
    full = rows["full"]["1.0"]["by_family"]
    print(f"\n{mode}: score (share of full) by budget; full = {full['all']:.3f}")
    print(f"{'method':12} " + " ".join(f"{b:>12}" for b in res["budgets"]))
    for m, by_b in rows.items():
      if m == "full":
        continue
      cells = []
      for b in res["budgets"]:
        r = by_b.get(str(b), {})
        if "error" in r:
          cells.append("error")
          continue
        acc = r["by_family"]["all"]
        cells.append(f"{acc:.3f} ({acc / max(full['all'], 1e-9):.2f})")
      print(f"{m:12} " + " ".join(f"{c:>12}" for c in cells))
  for preset, sp in res.get("speed", {}).items():
    print(f"\nspeed {preset}: batch {sp['batch']}, prompt {sp['prompt']}, budget {sp['budget']}")
    for r in sp["rows"]:
      print(f"  {r['method']:12} {r['tokens_per_s']:10,.0f} tok/s  x{r['speedup_vs_full']:.2f}  "
            f"KV {r['kv_fraction']:.3f}")


def plots(res: dict, out_dir: Path, backend: str, name: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  made = []
  modes = [m for m in ("aware", "agnostic") if m in res]
  if modes:
    kinds = ["localization", "aggregation", "all"]
    fig, axes = plt.subplots(len(modes), len(kinds), figsize=(4 * len(kinds), 3.2 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
      rows = res[mode]
      full = rows["full"]["1.0"]["by_family"]
      for j, kind in enumerate(kinds):
        ax = axes[i][j]
        for m, by_b in rows.items():
          if m == "full":
            continue
          pts = [(b, by_b[str(b)]["by_family"].get(kind)) for b in res["budgets"]
                 if "error" not in by_b.get(str(b), {"error": 1})]
          if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(full.get(kind, 0), color="k", ls="--", label="full cache")
        ax.set_xscale("log")
        ax.set_xlabel("budget (share of the prompt)")
        ax.set_title(f"{kind} ({'query-aware' if mode == 'aware' else 'query-agnostic'})",
                     fontsize=9)
        ax.set_ylim(-0.02, 1.02)
      axes[i][0].set_ylabel("score")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / f"{name}_scores_{backend}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p.name)
  if "grid" in res:
    names = [k for k in res["grid"] if k != "errors"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, m in zip(axes[0], names):
      g = res["grid"][m]
      ax.imshow(np.asarray(g["accuracy"], float), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
      ax.set_xticks(range(len(g["lengths"])), g["lengths"], fontsize=7)
      ax.set_yticks(range(len(g["depths"])), g["depths"], fontsize=7)
      ax.set_title(f"{m} {g['mean']:.2f}", fontsize=9)
    axes[0][0].set_ylabel("depth")
    fig.suptitle(f"needle: full cache vs budget {res.get('grid_budget')}", fontsize=9)
    fig.tight_layout()
    p = out_dir / f"{name}_needle_{backend}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p.name)
  return made


if __name__ == "__main__":
  main()
