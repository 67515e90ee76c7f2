"""python -m experiments bench search: best-of-N, beam search, DVTS, REBASE and ETS on the
reasoning task, with the policy and process reward model of experiments.reasoning_train.

For each width and method, every held-out problem is searched on its own tree over the paged
pool (search.tree), the PRM scoring every candidate (search.prm.PRMScorer). Per problem:
weighted-majority and best-PRM accuracy (exact checker), pass@N (any finished solution right),
KV held in pages (mean and peak over the search, with and without the prompt's pages) and in
distinct step tokens (the ETS code's measure: shared ancestors once, the prompt excluded), policy
calls, tokens generated; per cell: problems/s and the ILP's share of the wall time. The greedy
policy's accuracy is the reference the search must beat. --lambda-b / --lambda-s sweep ETS.

  python -m experiments bench search --model runs/reasoning        # widths 16 64 256
  python -m experiments bench search --quick                        # CPU: trains a toy pair
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.results import RESULTS_DIR, compile_seconds, write_results


def _spec(info: dict) -> tuple[str, dict]:
  """(family, problem settings) of the training run: its config's, so that the problems are
  what the policy learned (another spec is outside its training)."""
  fam = info.get("family", "countdown")
  spec = info.get("spec") or (info.get("config") or {}).get(fam) or {}
  return fam, {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def _problems(info: dict, n: int, seed: int):
  from experiments import reasoning
  fam, spec = _spec(info)
  if fam == "countdown":
    return reasoning.countdown(n, reasoning.CountdownSpec(**spec), seed=seed)
  return reasoning.arithmetic(n, reasoning.ArithmeticSpec(**spec), seed=seed)


def greedy_accuracy(policy, tok, problems, stop: int, max_new: int) -> float:
  """The policy's greedy accuracy (the exact checker on its solution text)."""
  from experiments import reasoning
  from kvcache import generate
  prompts = [tok.encode(p.prompt + reasoning.STEP, add_special_tokens=False).ids
             for p in problems]
  out = generate(policy, prompts, max_new_tokens=max_new, stop_tokens=[stop])
  texts = [tok.decode([t for t in ids if t != stop]) for ids in out]
  return float(np.mean([reasoning.check_answer(p, t) for p, t in zip(problems, texts)]))


def search_cell(policy, scorer, tok, problems, cfg, *, stop: int, step: int, seed: int,
                max_step_tokens: int, max_depth: int, temperature: float, page_size: int,
                kv_budget: int | None = None, workers: int | None = None) -> dict:
  """One width x method over the problems: accuracies, KV, calls, speed.

  kv_budget None: each problem searched alone on its own tree (a pool it cannot fill).
  Otherwise: all problems through one pool of kv_budget x width tokens, searched side by side
  (search.methods.run_searches: admitted by free pages, sharing the policy's calls; ETS's
  selections of a round in `workers` processes, default search.methods.default_workers()).
  """
  from experiments import reasoning
  from kvcache.sampling import SamplingConfig
  from search.methods import run_search, run_searches
  from search.tree import SearchTree
  prompts = [tok.encode(p.prompt + reasoning.STEP, add_special_tokens=False).ids
             for p in problems]

  def answer_of(p, start):
    return lambda path: reasoning.parse_solution(p, _text(tok, path, start, stop))[1]

  tree_kw = dict(step_token=step, stop_tokens=[stop], page_size=page_size,
                 max_step_tokens=max_step_tokens, max_depth=max_depth,
                 sampling=SamplingConfig(temperature=temperature))
  if kv_budget is not None:
    from search.methods import selection_worker_count, selection_workers
    w = selection_worker_count(cfg, len(problems), workers)
    if w > 1:
      selection_workers(w)  # started before the clock, as a server's would be
  c0 = compile_seconds()
  t0 = time.perf_counter()
  batch = None
  if kv_budget is None:
    results = []
    for i, prompt in enumerate(prompts):
      tree = SearchTree(policy, prompt, num_pages=_pages(cfg.width, len(prompt), max_depth,
                                                         max_step_tokens, page_size),
                        seed=seed + i, **tree_kw)
      results.append(run_search(tree, scorer, cfg, answer_of(problems[i], len(prompt))))
  else:
    tree = SearchTree(policy, None, num_pages=-(-kv_budget * cfg.width // page_size), seed=seed,
                      **tree_kw)
    results, batch = run_searches(tree, scorer, cfg, [(q, answer_of(p, len(q)))
                                                      for p, q in zip(problems, prompts)],
                                  workers=workers)
  wall = time.perf_counter() - t0
  rows = []
  for p, prompt, res in zip(problems, prompts, results):
    checked = [(a, s, reasoning.check_answer(p, _text(tok, path, len(prompt), stop)))
               for a, s, path in res.solutions]
    correct = {}
    for a, s, ok in checked:
      correct.setdefault(a, []).append((s, ok))
    best = max(((s, ok) for _, s, ok in checked), default=(0, False))
    # Weighted majority: the answer with the most PRM mass; its best-scored solution is checked
    # (Countdown's answer is its target, so the steps decide, as for best-PRM).
    vote_ok = max(correct[res.vote])[1] if res.vote in correct else False
    rows.append({"vote": float(vote_ok), "best": float(best[1]),
                 "pass": float(any(ok for v in correct.values() for _, ok in v)),
                 "solutions": len(res.solutions), "model_calls": res.model_calls,
                 "prm_calls": res.prm_calls, "tokens": res.tokens_generated, **res.kv})
  # The driver's wall time in ETS's selections (side by side: a round's run in parallel).
  ilp = sum(r.ilp_s for r in results) if batch is None else batch.ilp_s
  # Shapes first seen in this cell compile inside it (tree sizes differ between methods): the
  # rate leaves that time out and the file keeps both.
  compile_s = compile_seconds() - c0
  run = max(wall - compile_s, 1e-9)
  mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  out = {"accuracy_vote": mean["vote"], "accuracy_best": mean["best"],
         "pass_at_n": mean["pass"], "mean_pages": mean["mean_pages"],
         "peak_pages": mean["peak_pages"], "mean_pages_no_prompt": mean["mean_pages_no_prompt"],
         "peak_pages_no_prompt": mean["peak_pages_no_prompt"],
         "mean_tokens_no_prompt": mean["mean_tokens_no_prompt"],
         "peak_tokens_no_prompt": mean["peak_tokens_no_prompt"],
         "model_calls": mean["model_calls"],
         "prm_calls": mean["prm_calls"], "tokens": mean["tokens"],
         "solutions": mean["solutions"], "problems_per_s": len(problems) / run,
         "problems_per_s_with_compile": len(problems) / wall, "wall_s": wall,
         "compile_s": compile_s, "ilp_share": ilp / run}
  if batch is not None:  # calls shared by the problems: the pool's totals per problem
    out.update(model_calls=batch.model_calls / len(problems),
               prm_calls=batch.prm_calls / len(problems), rounds=batch.rounds,
               mean_active=batch.mean_active, peak_active=batch.peak_active,
               retracted=batch.retracted, pool_pages=tree.pool.num_pages,
               pool_peak_pages=batch.peak_pages, ilp_cpu_s=batch.ilp_cpu_s,
               workers=batch.workers)
  return out


def _text(tok, path, start: int, stop: int) -> str:
  return tok.decode([t for t in path[start:] if t != stop])


def _pages(width: int, prompt: int, depth: int, step: int, page: int) -> int:
  """Pool pages that cannot run out: every leaf's own pages plus the prompt's, a power of two."""
  need = -(-prompt // page) + width * (-(-(depth * step) // page) + 1) + 8
  return 1 << (need - 1).bit_length()


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for m in sorted({r["method"] for r in rows}):
    pts = sorted((r["width"], r) for r in rows if r["method"] == m and r.get("sweep") is None)
    axes[0].plot([r["mean_pages_no_prompt"] for _, r in pts], [r["accuracy_vote"] for _, r in pts],
                 marker="o", label=m)
    axes[1].plot([w for w, _ in pts], [r["problems_per_s"] for _, r in pts], marker="o", label=m)
  axes[0].set_xscale("log")
  axes[0].set_xlabel("mean KV pages held (prompt excluded)")
  axes[0].set_ylabel("accuracy (weighted majority)")
  axes[1].set_xscale("log", base=2)
  axes[1].set_xlabel("width")
  axes[1].set_ylabel("problems / s")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  from search.methods import METHODS
  ap = argparse.ArgumentParser(prog="python -m experiments bench search")
  ap.add_argument("--model", default=None, help="a folder of experiments.reasoning_train")
  ap.add_argument("--quick", action="store_true", help="CPU: train a toy policy and PRM first")
  ap.add_argument("--widths", type=int, nargs="+", default=None)
  ap.add_argument("--methods", nargs="+", default=list(METHODS))
  ap.add_argument("--children", type=int, default=4, help="M: children per beam (beam, DVTS)")
  ap.add_argument("--n", type=int, default=None, help="held-out problems (default 32; quick 3)")
  ap.add_argument("--lambda-b", type=float, nargs="*", default=[],
                  help="ETS sweep values (one ETS cell per value and width)")
  ap.add_argument("--ets-lambda-b", type=float, default=1.0,
                  help="lambda_b of the ETS cells (the paper's 1.0 by default; sweeps vary it)")
  ap.add_argument("--lambda-s", type=float, nargs="*", default=[],
                  help="ETS sweep values (one ETS cell per value and width)")
  ap.add_argument("--temperature", type=float, default=1.0, help="the policy's sampling")
  ap.add_argument("--max-step-tokens", type=int, default=24)
  ap.add_argument("--max-depth", type=int, default=8)
  ap.add_argument("--page-size", type=int, default=16)
  ap.add_argument("--kv-budget", type=int, default=None,
                  help="search all problems side by side in one pool of this many tokens per "
                       "unit of width (a serving system's fixed KV memory); default: each "
                       "problem alone")
  ap.add_argument("--workers", type=int, default=None,
                  help="with --kv-budget: processes for ETS's per-search selections of a round "
                       "(default: one per spare core, at most 8; 1: in the driver)")
  ap.add_argument("--seed", type=int, default=12345)
  ap.add_argument("--out", default=None)
  ap.add_argument("--name", default="search")
  args = ap.parse_args(argv)
  from search.ets import ETSConfig, solver_name
  from search.methods import SearchConfig
  widths = args.widths or ([4, 8] if args.quick else [16, 64, 256])
  for m in args.methods:
    SearchConfig(m, width=max(widths), children=min(args.children, min(widths)))
  if args.workers is not None and args.workers < 1:
    raise SystemExit(f"--workers must be >= 1, got {args.workers}")
  if args.kv_budget is not None and args.kv_budget < 1:
    raise SystemExit(f"--kv-budget must be >= 1 token per unit of width, got {args.kv_budget}")
  for x in args.lambda_b + args.lambda_s + [args.ets_lambda_b]:
    if x < 0:
      raise SystemExit(f"lambdas must be >= 0, got {x}")
  if args.model is None and not args.quick:
    raise SystemExit("pass --model DIR (experiments.reasoning_train's output) or --quick")
  from experiments.reasoning_train import load_reasoning
  from search.prm import PRMScorer
  model_dir = args.model
  if model_dir is None:
    from experiments import reasoning_train
    model_dir = tempfile.mkdtemp(prefix="reasoning-")
    reasoning_train.main(["--quick", "--out", model_dir, "--results", model_dir])
  policy, prm, tok, info = load_reasoning(model_dir)
  from experiments import reasoning
  from experiments.data import eot_token_id
  stop = eot_token_id(tok)
  step = reasoning.step_token_id(lambda s: tok.encode(s, add_special_tokens=False).ids)
  n = args.n or (3 if args.quick else 32)
  problems = _problems(info, n, args.seed)
  scorer = PRMScorer(prm)
  longest = max(len(tok.encode(p.prompt + reasoning.STEP, add_special_tokens=False).ids)
                for p in problems)
  max_new = min(args.max_depth * args.max_step_tokens, policy.cfg.max_seq_len - longest)
  res = {"model": str(model_dir), "model_info": {k: v for k, v in info.items()
                                                 if isinstance(v, int | float | str)},
         "problem_spec": _spec(info)[1], "n": n, "widths": widths, "methods": args.methods,
         "children": args.children,
         "temperature": args.temperature, "max_depth": args.max_depth,
         "ilp_solver": solver_name(), "page_size": args.page_size,
         "kv_budget": args.kv_budget, "ets_lambda_b": args.ets_lambda_b,
         "ilp_share_counts": "clustering", "cpu_count": os.cpu_count(),
         "greedy_accuracy": greedy_accuracy(policy, tok, problems, stop, max_new), "rows": []}
  out_dir = Path(args.out) if args.out else RESULTS_DIR
  kw = dict(stop=stop, step=step, seed=args.seed, max_step_tokens=args.max_step_tokens,
            max_depth=args.max_depth, temperature=args.temperature, page_size=args.page_size,
            kv_budget=args.kv_budget, workers=args.workers)
  from tqdm import tqdm
  cells = [(w, m, None) for w in widths for m in args.methods]
  cells += [(w, "ets", ("lambda_b", x)) for w in widths for x in args.lambda_b]
  cells += [(w, "ets", ("lambda_s", x)) for w in widths for x in args.lambda_s]
  for w, m, sweep in tqdm(cells, desc="bench search"):
    ets = ETSConfig(lambda_b=args.ets_lambda_b)
    ets = ets if sweep is None else dataclasses.replace(ets, **{sweep[0]: sweep[1]})
    cfg = SearchConfig(m, width=w, children=min(args.children, w), ets=ets)
    row = {"width": w, "method": m, **search_cell(policy, scorer, tok, problems, cfg, **kw)}
    if sweep is not None:
      row["sweep"] = f"{sweep[0]}={sweep[1]}"
    res["rows"].append(row)
    path = write_results(args.name, res, out_dir)
  by = defaultdict(dict)
  for r in res["rows"]:
    if r.get("sweep") is None:
      by[r["width"]][r["method"]] = r
  for r in res["rows"]:
    reb = by[r["width"]].get("rebase")
    if reb is not None:
      r["kv_x_vs_rebase"] = reb["mean_pages_no_prompt"] / max(r["mean_pages_no_prompt"], 1e-9)
      r["kv_tokens_x_vs_rebase"] = (reb["mean_tokens_no_prompt"]
                                    / max(r["mean_tokens_no_prompt"], 1e-9))
      r["speed_x_vs_rebase"] = r["problems_per_s"] / max(reb["problems_per_s"], 1e-9)
  png = out_dir / f"{path.stem}.png"
  plot(res["rows"], png)
  res["plots"] = [png.name]
  path = write_results(args.name, res, out_dir)
  print(f"\ngreedy accuracy {res['greedy_accuracy']:.3f} on {n} problems")
  print(f"{'width':>5} {'method':10} {'vote':>6} {'best':>6} {'pass':>6} {'pages':>8} "
        f"{'x KV':>6} {'prob/s':>7} {'compile s':>9} {'ILP %':>6} {'active':>6}")
  for r in res["rows"]:
    print(f"{r['width']:5d} {r['method']:10} {r['accuracy_vote']:6.3f} {r['accuracy_best']:6.3f} "
          f"{r['pass_at_n']:6.3f} {r['mean_pages_no_prompt']:8.1f} "
          f"{r.get('kv_x_vs_rebase', float('nan')):6.2f} {r['problems_per_s']:7.3f} "
          f"{r['compile_s']:9.1f} {100 * r['ilp_share']:6.1f} {r.get('mean_active', 1):6.1f} "
          f"{r.get('sweep') or ''}")
  print(f"results: {path}")
  return res


if __name__ == "__main__":
  main()
