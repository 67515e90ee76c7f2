"""README result tables generated from the benchmark JSON files under results/, never typed by hand.

Each `results/<name>_<backend>.json` (see experiments/results.py) becomes one markdown table,
followed by a line naming the device, JAX version, commit and date. In the README a table lives
between `<!-- results:train_gpu:begin -->` and `<!-- results:train_gpu:end -->` (the file stem).
The issues' targets table (`results:targets`, experiments/targets.py) is generated the same way.

  python -m experiments report                     # rewrite the tables in README.md
  python -m experiments report --check             # exit 1 if README.md is out of date (CI)
  python -m experiments report --print             # print every table
  python -m experiments.report --readme README.md --results results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MISSING = "–"  # a cell whose row lacks the column
MARKER = re.compile(r"<!-- results:(?P<name>[\w.-]+):begin -->(?P<body>.*?)"
                    r"<!-- results:(?P=name):end -->", re.DOTALL)
BEGIN = re.compile(r"<!-- results:([\w.-]+):begin -->")

Formatter = Callable[[Any], str]


# Cell formatters ----------------------------------------------------------------------------------

def _plain(v: Any) -> str:
  if isinstance(v, bool) or v is None:
    return str(v)
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if v != v or v in (float("inf"), float("-inf")):
      return str(v)
    if abs(v) >= 1e4:
      return f"{v:,.0f}"
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return ",".join(_plain(x) for x in v)
  return str(v).replace("|", "\\|").replace("\n", " ")


def _ms(v: float) -> str:
  return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _rate(v: float) -> str:
  return f"{v:,.0f}"


def _pct(v: float) -> str:
  return f"{100 * v:.1f}%"


def _flops(v: float | None) -> str:
  return "–" if v is None else f"{v:.3g}"


def _count(v: int) -> str:
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(v) >= scale:
      return f"{v / scale:.3g}{suffix}"
  return str(v)


# Per-benchmark column specs: (header, row key, formatter). Keys absent from every row are dropped.

@dataclasses.dataclass(frozen=True)
class TableSpec:
  """How one benchmark's rows become a table."""

  columns: tuple[tuple[str, str, Formatter], ...]  # (header, row key, cell formatter)
  note: Callable[[dict], str | None] = lambda payload: None  # a line under the table, from extras
  keep: Callable[[dict], bool] = lambda row: True  # which rows the table shows
  rows: Callable[[dict], list[dict]] | None = None  # rows derived from a nested payload


def _train_note(p: dict) -> str | None:
  peak = p.get("peak_tflops")
  return None if peak is None else f"MFU against a peak of {peak:g} TFLOP/s."


def _decode_note(p: dict) -> str | None:
  bw = p.get("copy_bandwidth_GBps")
  if bw is None:
    return None
  return (f"Roofline step: bytes of weights + KV attended, over the measured copy bandwidth "
          f"({bw:,.0f} GB/s).")


def _x(v: float) -> str:
  return f"{v:.2f}x"


def _signed_pct(v: float) -> str:
  return f"{100 * v:+.1f}%"


def _s_to_ms(v: float) -> str:
  return _ms(1e3 * v)


def _mib(v: int) -> str:
  return f"{v / 2**20:,.1f}"


def _s2_bench_note(p: dict) -> str | None:
  shape = p.get("shape", {})
  return (f"Context {p.get('seq')} tokens, batch 1, {p.get('dtype')}; {shape.get('n_layers')} "
          f"layers, d_model {shape.get('d_model')}, {shape.get('heads')} heads / "
          f"{shape.get('kv_heads')} KV heads; S2 block {p.get('block_size')}, local "
          f"{p.get('local_blocks')} blocks, vertical stride {p.get('stride')}. `s2_hybrid4`: the "
          f"last layer of four dense.")


def _grid_note(p: dict) -> str:
  return f"needle grid at budget {p.get('grid_budget')}; " if "grid" in p else ""


def _speed_note(p: dict) -> str:
  sp = next(iter(p["speed"].values()))
  return (f"Decode speed alone ({p.get('model_config') or p.get('model')}): greedy decoding of "
          f"{sp['new']} tokens after a {sp['prompt']}-token random prompt at batch "
          f"{sp['batch']}, the full cache against each press at budget {sp['budget']} (applied "
          f"after prefill); KV held: bytes of K/V over the full cache's.")


def _s2_retrieval_note(p: dict) -> str:
  v = p.get("verdict") or {}
  per = "; ".join(
      f"{name}: {x.get('outcome')} (" + ", ".join(
          f"seed {s}: {len(c['failed_cells'])} of {c['dense_cells_99']} cells"
          for s, c in x.get("per_seed", {}).items()) + ")"
      for name, x in (v.get("hybrids") or {}).items())
  return (f"Task {p.get('task', 'passkey')}; grid {p.get('lengths')} tokens x depths "
          f"{p.get('depths')}, {p.get('samples')} examples per cell (exact match, teacher-forced); "
          f"training depths {p.get('depth_range')}. Target: each hybrid >= 99% on every cell "
          f"where dense is >= 99% (final grids); cells below: {per}. Outcome: "
          f"{v.get('outcome')}.")


def _s2_quality_note(p: dict) -> str:
  c, v = p.get("corpus") or {}, p.get("verdict") or {}
  per = "; ".join(
      f"{name}: " + ", ".join(f"{b} {100 * x['gap']:+.2f}% (2x seed spread "
                              f"{200 * x['seed_spread']:.2f}%)" for b, x in
                              x.get("buckets", {}).items()) + f" -> {x.get('outcome')}"
      for name, x in (v.get("hybrids") or {}).items())
  return (f"Corpus `{c.get('source')}` ({c.get('train_tokens', 0) / 1e6:.1f}M train tokens, "
          f"{c.get('packages')} packages). Gap vs dense, mean over seeds, per position bucket: "
          f"{per}. Outcome: {v.get('outcome')}.")


def press_rows(p: dict) -> list[dict]:
  """bench press: one row per mode, method and budget (score, share of the full cache's,
  localization / aggregation scores, KV held), then the speed rows (mode 'speed ...')."""
  out = []
  for mode in ("aware", "agnostic"):
    if mode not in p:
      continue
    full = p[mode]["full"]["1.0"]["by_family"]["all"]
    for method, by_b in p[mode].items():
      for budget, r in by_b.items():
        if "error" in r:
          continue
        fam = r["by_family"]
        out.append({"mode": "query-aware" if mode == "aware" else "query-agnostic",
                    "method": method, "budget": float(budget), "score": fam["all"],
                    "share of full": fam["all"] / full if full else None,
                    "localization": fam.get("localization"), "aggregation": fam.get("aggregation"),
                    "KV held": r.get("kv_fraction", 1.0),
                    "needle grid": (p.get("grid", {}).get(method, {}).get("mean")
                                    if float(budget) in (1.0, p.get("grid_budget")) else None)})
  for preset, sp in p.get("speed", {}).items():
    for r in sp["rows"]:
      out.append({"mode": f"speed: {preset}, batch {sp['batch']}, {sp['prompt']} tokens",
                  "method": r["method"], "budget": 1.0 if r["method"] == "full" else sp["budget"],
                  "KV held": r["kv_fraction"], "decode tokens/s": r["tokens_per_s"],
                  "speed-up": r["speedup_vs_full"]})
  return out


def reasoning_rows(p: dict) -> list[dict]:
  """reasoning_train: one row, the policy's and the PRM's held-out metrics."""
  t = p.get("times", {})
  return [{"family": p.get("family"), "params": p.get("params"),
           "policy steps": p.get("policy_steps"), "PRM steps": p.get("prm_steps"),
           "greedy accuracy": p.get("policy_accuracy"),
           "PRM step accuracy": p.get("prm_step_accuracy"), "PRM step AUC": p.get("prm_step_auc"),
           "PRM outcome AUC": p.get("prm_outcome_auc"), "wall s": t.get("wall_s")}]


def longctx_rows(p: dict) -> list[dict]:
  """longctx_train: exact match per family at each evaluation step."""
  fams = list(p.get("final", {}))
  return [{"step": e["step"], **{f: e[f] for f in fams if f != "needle_grid"},
           "needle grid": e["needle_grid"]["mean"]} for e in p.get("evals", [])]


def _workers(p: dict) -> int:
  """Worker processes that ran ETS's selections in a side-by-side search file (1: none)."""
  return max([r.get("workers", 1) for r in p.get("rows", []) if r.get("method") == "ets"],
             default=1)


SPECS: dict[str, TableSpec] = {
    "train": TableSpec(
        columns=(("preset", "preset", _plain), ("chains", "chains", _plain),
                 ("params", "params", _count), ("batch", "batch", _plain),
                 ("seq len", "seq_len", _plain), ("dtype", "dtype", _plain),
                 ("step ms", "step_ms", _ms), ("tokens/s", "tokens_per_s", _rate),
                 ("MFU", "mfu", _pct)),
        note=_train_note),
    "decode": TableSpec(
        columns=(("preset", "preset", _plain), ("decode attention", "decode_attn", _plain),
                 ("params", "params", _count),
                 ("batch", "batch", _plain), ("prompt", "prompt", _plain),
                 ("new tokens", "new_tokens", _plain), ("step ms", "step_ms", _ms),
                 ("roofline ms", "roofline_step_ms", _ms), ("tokens/s", "tokens_per_s", _rate),
                 ("% of roofline", "roofline_fraction", _pct)),
        note=_decode_note),
    "colm_train": TableSpec(
        columns=(("variant", "variant", _plain), ("chains", "chains", _plain),
                 ("params", "params", _count), ("ffn_dim", "ffn_dim", _plain),
                 ("step ms", "step_ms", _ms), ("tokens/s", "tokens_per_s", _rate),
                 ("vs (1,)", "vs_baseline", _x)),
        note=lambda p: f"Batch {p.get('train_batch')} x {p.get('train_seq')} tokens, "
                       f"{p.get('dtype')}; forward, backward and AdamW in one jit step."),
    "colm_prefill": TableSpec(
        columns=(("chains", "chains", _plain), ("prompt", "prompt_tokens", _plain),
                 ("params", "params", _count), ("chain-1 params", "chain1_params", _count),
                 ("full ms", "full_ms", _ms), ("chain-1 ms", "chain1_ms", _ms),
                 ("speed-up", "speedup", _x), ("FLOP ratio", "flop_ratio", _x),
                 ("attention share, full", "full_attn_share", _pct),
                 ("attention share, chain 1", "chain1_attn_share", _pct),
                 ("same argmax", "same_argmax", _plain)),
        note=lambda p: "CoLM-Air, batch 1, bf16: `prefill_last` (all chains over the prompt) "
                       "against `air_prefill` (chain 1 over the prompt, the last token through "
                       "all chains); same cache and first-token logits. FLOP ratio: the full "
                       "prefill's model FLOPs over chain 1's (ModelConfig.prefill_flops, the LM "
                       "head left out); attention share: causal attention's part of each."),
    "colm_experiments": TableSpec(
        columns=(("variant", "variant", _plain), ("chains", "chains", _plain),
                 ("Air", "air", _plain), ("params", "params", _count),
                 ("tokens", "tokens", _count), ("val loss", "val_loss", _plain),
                 ("val ppl", "val_ppl", _plain),
                 ("val ppl per scale (1..k chains)", "val_ppl_per_scale", _plain),
                 ("wall s", "wall_s", lambda v: f"{v:.0f}"))),
    "colm_parity": TableSpec(
        columns=(("variant", "variant", _plain), ("chains", "chains", _plain),
                 ("Air", "air", _plain), ("lr", "lr", _plain), ("params", "params", _count),
                 ("tokens", "tokens", _count), ("epochs", "epochs", lambda v: f"{v:.2f}"),
                 ("val loss per scale (1..k chains)", "val_loss_per_scale", _plain),
                 ("vs best baseline", "gap_vs_best_baseline", _signed_pct),
                 ("within 2%", "within_target", _plain),
                 ("wall s", "wall_s", lambda v: f"{v:.0f}")),
        note=lambda p: (f"Corpus `{(p.get('corpus') or {}).get('source')}` "
                        f"({(p.get('corpus') or {}).get('train_tokens', 0) / 1e6:.1f}M train "
                        f"tokens); best-tuned baseline: "
                        f"{(p.get('best_baseline') or {}).get('variant')}, val loss "
                        f"{(p.get('best_baseline') or {}).get('val_loss', float('nan')):.4f}. "
                        f"Gap: val loss / best baseline's - 1 (full model).")),
    "colm_progressive_flops": TableSpec(
        columns=(("variant", "variant", _plain), ("chains", "chains", _plain),
                 ("stage steps", "stage_steps", _plain), ("FLOPs", "flops", _flops),
                 ("FLOPs / F", "flops_vs_budget", lambda v: f"{v:.3f}"),
                 ("val loss per scale (1..k chains)", "val_loss_per_scale", _plain),
                 ("FLOPs to scratch's final loss", "flops_to_scratch_loss", _flops),
                 ("wall s", "wall_s", lambda v: f"{v:.0f}")),
        note=lambda p: (f"Budget F = {_flops(p.get('budget_flops'))} training FLOPs "
                        f"(ModelConfig.flops_per_token x tokens); pass: "
                        + "; ".join(f"{k}: reaches scratch within F "
                                    f"{v.get('reaches_scratch_within_budget')}, beats chain 1 "
                                    f"alone {v.get('beats_chain1_only')}"
                                    for k, v in (p.get("pass") or {}).items()) + ".")),
    "s2_cache": TableSpec(
        columns=(("variant", "variant", _plain), ("tokens", "tokens", _plain),
                 ("heads cover context", "heads_cover_context", _plain),
                 ("dense MiB", "dense_bytes", _mib), ("S2 MiB", "s2_bytes", _mib),
                 ("smaller by", "ratio", _x)),
        note=lambda p: f"Decode cache of {p.get('model')}, local window "
                       f"{p.get('local_window_tokens')} tokens; S2 bytes include the int32 "
                       f"position index. 32K rows shown; 8K and 128K are in the JSON.",
        keep=lambda r: r.get("tokens") == 32768),
    "s2_bench": TableSpec(
        columns=(("part", "part", _plain), ("stack", "variant", _plain),
                 ("train step ms", "step_s", _s_to_ms), ("train tokens/s", "tokens_per_s", _rate),
                 ("decode ms/token", "decode_ms_per_token", _ms),
                 ("decode tokens/s", "decode_tokens_per_s", _rate),
                 ("cache MiB", "cache_bytes", _mib),
                 ("cache smaller by", "cache_ratio_vs_dense", _x),
                 ("speed-up vs dense", "speedup_vs_dense", _x)),
        note=_s2_bench_note),
    "s2_decode": TableSpec(
        columns=(("stack", "variant", _plain), ("batch", "batch", _plain),
                 ("context", "context", _plain), ("ms/token", "decode_ms_per_token", _ms),
                 ("tokens/s", "decode_tokens_per_s", _rate),
                 ("% of roofline", "roofline_fraction", _pct),
                 ("cache MiB", "cache_bytes", _mib),
                 ("speed-up vs dense", "speedup_vs_dense", _x),
                 ("ideal (bytes ratio)", "ideal_speedup", _x),
                 ("of ideal", "speedup_over_ideal", _pct)),
        note=lambda p: (f"{_s2_bench_note(p).replace('batch 1, ', '')} Greedy decoding of "
                        f"{next(iter(p['decode'].values()))['new_tokens']} tokens in kvcache's "
                        f"one decode loop; S2 stacks with S2's eviction policy. Ideal: the ratio "
                        f"of bytes read per token (weights + K/V, positions held). Roofline at "
                        f"{p.get('copy_bandwidth_GBps', 0):,.0f} GB/s measured copy bandwidth.")),
    "prefill": TableSpec(
        columns=(("context", "context", _plain), ("chunk", "chunk", _plain),
                 ("batch", "batch", _plain), ("one-shot ms", "one_shot_ms", _ms),
                 ("chunked ms", "chunked_ms", _ms), ("chunked / one-shot", "ratio", _x),
                 ("max logit diff", "max_logit_diff", lambda v: f"{v:.3g}")),
        note=lambda p: f"{p.get('model')}. One-shot: each layer's attention function over the "
                       f"prompt (cuDNN); chunked: the first chunk so, then each chunk onto the "
                       f"cache (Pallas prefill kernel over stored positions)."),
    "paged_memory": TableSpec(
        columns=(("groups", "groups", _plain), ("prompts per group", "per_group", _plain),
                 ("prefix", "prefix", _plain), ("suffix", "suffix", _plain),
                 ("page size", "page_size", _plain), ("pages held", "pages_held", _plain),
                 ("tree optimum", "tree_optimum_pages", _plain),
                 ("over optimum", "over_optimum", _signed_pct),
                 ("pages without sharing", "pages_without_sharing", _plain),
                 ("saving", "saving_vs_unshared", _x))),
    "paged_speed": TableSpec(
        columns=(("page size", "page_size", _plain), ("contiguous ms", "contiguous_kernel_ms", _ms),
                 ("paged ms", "paged_kernel_ms", _ms),
                 ("paged / contiguous speed", "paged_over_contiguous_speed", _x),
                 ("per-sequence paged ms", "per_sequence_paged_ms", _ms),
                 ("shared-prefix ms", "shared_prefix_ms", _ms),
                 ("its kernel alone ms", "shared_kernel_alone_ms", _ms),
                 ("prefix part alone ms", "shared_prefix_part_ms", _ms),
                 ("own part alone ms", "shared_own_part_ms", _ms),
                 ("shared-prefix speed-up", "shared_prefix_speedup", _x)),
        note=lambda p: (lambda r: f"Decode attention, bf16, {r.get('kv_heads')} KV heads x "
                        f"{r.get('group')} query heads, head dim {r.get('head_dim')}. Paged vs "
                        f"contiguous: batch {r.get('batch')}, {r.get('context')} tokens. "
                        f"Shared prefix: {r.get('groups')} groups x {r.get('per_group')} "
                        f"sequences, {r.get('prefix')}-token prefix + {r.get('suffix')}-token "
                        f"suffix each; shared-prefix: the prefix part (a group's rows over its "
                        f"prefix pages, once) and the own part (each sequence's suffix pages) "
                        f"in one launch of the paged kernel, merged by log-sum-exp; the parts "
                        f"alone: each in a launch of its own. Median of samples of "
                        f"{r.get('inner_calls')} calls "
                        f"dispatched back to back.")(table_rows(p)[0])),
    "triton_attention": TableSpec(
        columns=(("impl", "impl", _plain), ("layout", "layout", _plain), ("T", "T", _plain),
                 ("forward GFLOP", "fwd_gflop", _plain), ("forward ms", "fwd_ms", _ms),
                 ("TFLOP/s", "fwd_tflops", lambda v: f"{v:.1f}"), ("error", "error", _plain)),
        note=lambda p: "Checked against the float32 reference (max relative error of o) at "
                       "their own length, not at each row's: " + "; ".join(
                           f"{c.get('impl')} {c.get('layout')} at T = {c.get('T')}: "
                           + (f"{c['max_rel_err']:.1e}" if c.get("max_rel_err") is not None
                              else str(c.get("error", "failed"))[:80])
                           for c in p.get("checks") or []) + "."),
    "batch": TableSpec(
        columns=(("scheduler", "scheduler", _plain), ("KV pages", "num_pages", _plain),
                 ("tokens/s", "total_tokens_per_s", _rate),
                 ("output tokens/s", "output_tokens_per_s", _rate),
                 ("compile s (apart)", "compile_s", lambda v: f"{v:.0f}"),
                 ("prefill tokens", "prefill_tokens", _count),
                 ("prefix saving of optimum", "prefix_saving_of_optimum", _pct),
                 ("peak live pages", "peak_live_pages", _plain),
                 ("mean decode batch", "mean_decode_batch", lambda v: f"{v:.0f}"),
                 ("same tokens as batchllm", "same_tokens_as_first", _pct)),
        note=lambda p: (f"Workload `{p.get('workload')}` (scale {p.get('scale')}, "
                        f"{p.get('requests')} requests{', shuffled' if p.get('shuffled') else ''}"
                        f"), `{p.get('preset')}` model ({p.get('dtype')}, random spread weights),"
                        f" page size {table_rows(p)[0].get('page_size')}, token budget "
                        f"{table_rows(p)[0].get('token_budget')}, chunk "
                        f"{table_rows(p)[0].get('chunk')}. tokens/s: prompt + output tokens of "
                        f"all requests over the time of the steps that compiled nothing.")),
    "press": TableSpec(
        columns=(("mode", "mode", _plain), ("method", "method", _plain),
                 ("budget", "budget", _pct), ("score", "score", lambda v: f"{v:.3f}"),
                 ("share of full", "share of full", _pct),
                 ("localization", "localization", lambda v: f"{v:.3f}"),
                 ("aggregation", "aggregation", lambda v: f"{v:.3f}"),
                 ("needle grid", "needle grid", _pct), ("KV held", "KV held", _pct),
                 ("decode tokens/s", "decode tokens/s", _rate), ("speed-up", "speed-up", _x)),
        rows=press_rows,
        note=lambda p: _speed_note(p) if "speed" in p and "aware" not in p else (
                        f"Suite at {p.get('length')} tokens, {p.get('n')} examples per family "
                        f"(7 families), greedy, exact scorers; KV held: bytes of K/V after "
                        f"compression over the full cache's, {p.get('room')} free slots per head "
                        f"included; {_grid_note(p)}WindowKV's "
                        f"task switch: {p.get('task_switch')} (accuracy "
                        f"{p.get('classifier_accuracy')}); press options "
                        f"{p.get('options') or 'none (the papers defaults)'}.")),
    "mpc": TableSpec(
        columns=(("protocol", "protocol", _plain), ("T", "T", _plain),
                 ("method", "method", _plain), ("static", "static", _pct),
                 ("attended", "attended_tokens", _plain), ("MB sent", "mb", lambda v: f"{v:.2f}"),
                 ("messages", "send_actions", lambda v: f"{v:.0f}"),
                 ("LAN ms", "lan_ms", _ms), ("WAN ms", "wan_ms", _ms),
                 ("bytes x (opt.)", "bytes_x_vs_deferred", _x),
                 ("LAN x (opt.)", "lan_x_vs_deferred", _x),
                 ("bytes x (softmax)", "bytes_x_vs_softmax", _x),
                 ("LAN x (softmax)", "lan_x_vs_softmax", _x),
                 ("max abs err", "max_abs_err", lambda v: f"{v:.1e}")),
        note=lambda p: (f"One layer's decode-step attention in SPU {p.get('spu', {}).get('spu')}'s "
                        f"simulator (FM64), {p.get('heads')} heads, head dim {p.get('head_dim')}, "
                        f"party 0's bytes and messages; latency = messages x RTT + bytes / "
                        f"bandwidth, " + ", ".join(
                            f"{k} {_plain(v['rtt_ms'])} ms / {_plain(v['gbit_s'])} Gbit/s"
                            for k, v in p.get("networks", {}).items()) + ". x (opt.): "
                        f"over the optimised baseline (full_deferred, normalised after P.V); x "
                        f"(softmax): over full_softmax. MPCache: static eviction to `static` of T, "
                        f"{100 * p.get('keep', 0):.0f}% of the 32-token clusters selected plus the "
                        f"sink and newest, cross-layer sharing in groups of {p.get('share')} "
                        f"layers, the bounds update included; naive_topk: over the same "
                        f"statically kept tokens, as many as MPCache attends; max abs err: SPU's "
                        f"output against the float computation.")),
    "reasoning_train": TableSpec(
        columns=(("family", "family", _plain), ("params", "params", _count),
                 ("policy steps", "policy steps", _plain), ("PRM steps", "PRM steps", _plain),
                 ("greedy accuracy", "greedy accuracy", _pct),
                 ("PRM step accuracy", "PRM step accuracy", _pct),
                 ("PRM step AUC", "PRM step AUC", lambda v: f"{v:.3f}"),
                 ("PRM outcome AUC", "PRM outcome AUC", lambda v: f"{v:.3f}"),
                 ("wall s", "wall s", lambda v: f"{v:.0f}")),
        rows=reasoning_rows,
        note=lambda p: (f"Greedy accuracy on {p.get('policy_eval_problems')} held-out problems "
                        f"(exact checker); PRM step metrics on held-out noisy traces against the "
                        f"step checker; outcome AUC of the PRM's score on the policy's own greedy "
                        f"solutions; Math-Shepherd rollout labels on "
                        f"{p.get('rollout_traces_used')} traces.")),
    "search": TableSpec(
        columns=(("width", "width", _plain), ("method", "method", _plain),
                 ("sweep", "sweep", _plain), ("accuracy (vote)", "accuracy_vote", _pct),
                 ("accuracy (best PRM)", "accuracy_best", _pct), ("pass@N", "pass_at_n", _pct),
                 ("mean KV pages", "mean_pages_no_prompt", lambda v: f"{v:.1f}"),
                 ("peak KV pages", "peak_pages_no_prompt", lambda v: f"{v:.1f}"),
                 ("KV x (vs REBASE)", "kv_x_vs_rebase", _x),
                 ("mean KV tokens", "mean_tokens_no_prompt", lambda v: f"{v:.0f}"),
                 ("tokens x (vs REBASE)", "kv_tokens_x_vs_rebase", _x),
                 ("problems/s", "problems_per_s", lambda v: f"{v:.2f}"),
                 ("speed x (vs REBASE)", "speed_x_vs_rebase", _x),
                 ("compile s", "compile_s", lambda v: f"{v:.1f}"),
                 ("ILP share", "ilp_share", _pct),
                 ("problems at once", "mean_active", lambda v: f"{v:.1f}"),
                 ("retracted", "retracted", _plain)),
        note=lambda p: (f"{p.get('n')} held-out problems per cell (family "
                        f"{p.get('model_info', {}).get('family')}), policy greedy accuracy "
                        f"{100 * (p.get('greedy_accuracy') or 0):.1f}% on them; sampling "
                        f"temperature {p.get('temperature')}, at most {p.get('max_depth')} steps, "
                        f"{p.get('children')} children per beam (beam, DVTS); KV pages: pages of "
                        f"{p.get('page_size', 16)} tokens held, the prompt's excluded (mean over "
                        f"the search's steps, then over problems); "
                        + (f"all problems searched side by side in one pool of "
                           f"{p['kv_budget']} tokens per unit of width (admitted by free pages; "
                           f"problems at once: the mean over the rounds; retracted: searches "
                           f"restarted when the pool ran short); " if p.get("kv_budget") else "")
                        + f"ETS at lambda_b {p.get('ets_lambda_b', 1.0)} and the paper's "
                        f"lambda_s unless a sweep says otherwise, its ILP by "
                        f"{p.get('ilp_solver', 'cvxpy+HiGHS')}; ILP share: ETS's step "
                        f"selection ({p.get('ilp_share_counts', 'step embeddings, clustering')}"
                        f" and the program) over the wall time"
                        + (f" (side by side: the driver's wall time while a round's "
                           f"selections ran in {_workers(p)} worker processes)"
                           if _workers(p) > 1 else "")
                        + (", both with the cell's compile time (compile s) left out."
                           if any("compile_s" in r for r in p.get("rows", [])) else "."))),
    "longctx_train": TableSpec(
        columns=(("step", "step", _plain), ("needle", "needle", _pct),
                 ("multikey", "multikey", _pct), ("multivalue", "multivalue", _pct),
                 ("passkey", "passkey", _pct), ("vartrack", "vartrack", _pct),
                 ("common_words", "common_words", _pct),
                 ("frequent_words", "frequent_words", _pct), ("needle grid", "needle grid", _pct)),
        rows=longctx_rows,
        keep=lambda r: r["step"] % 2000 == 0 or r["step"] % 500 != 0,
        note=lambda p: (f"Teacher-forced exact match of the whole target on {p.get('eval_n')} "
                        f"val examples per family at {max(p.get('lengths', [0]))} tokens; "
                        f"{_count(p.get('params', 0))} parameters, prompt lengths "
                        f"{p.get('lengths')}, {p.get('steps')} steps of "
                        f"{1e3 * (p.get('step_s_median') or 0):.1f} ms.")),
    "s2_retrieval": TableSpec(
        columns=(("variant", "variant", _plain), ("layers", "layers", _plain),
                 ("seed", "seed", _plain), ("steps", "steps", _plain),
                 ("stopped", "stopped", _plain), ("to 90% mean", "steps_to_90_mean", _plain),
                 ("to 90% every cell", "steps_to_90_all", _plain),
                 ("to 99% every cell", "steps_to_99_all", _plain),
                 ("final mean", "final_mean", lambda v: f"{v:.3f}"),
                 ("worst cell", "final_min", lambda v: f"{v:.3f}"),
                 ("ms/step", "step_s", _s_to_ms),
                 ("fresh rows", "fresh_share", _pct)),
        rows=lambda p: [{**r, "final_mean": r["final"]["mean"],
                         "final_min": float(min(map(min, r["final"]["accuracy"])))}
                        for r in p.get("runs", [])],
        note=_s2_retrieval_note),
    "s2_quality": TableSpec(
        columns=(("variant", "variant", _plain), ("layers", "layers", _plain),
                 ("seed", "seed", _plain), ("steps", "steps", _plain),
                 ("epochs", "epochs", lambda v: f"{v:.2f}"),
                 ("val loss, all positions", ">=0", lambda v: f"{v:.4f}"),
                 ("positions ≥ 512", ">=512", lambda v: f"{v:.4f}"),
                 ("positions ≥ 2048", ">=2048", lambda v: f"{v:.4f}"),
                 ("ms/step", "step_s", _s_to_ms)),
        rows=lambda p: [{**r, **r.get("val", {})} for r in p.get("runs", [])],
        note=_s2_quality_note),
    "s2_experiments": TableSpec(
        columns=(("config", "config", _plain), ("val loss", "val_loss", _plain),
                 ("vs dense", "val_loss_vs_dense", _signed_pct),
                 ("passkey exact match", "passkey_mean", _pct),
                 ("step ms", "step_s_median", _s_to_ms),
                 ("step speed-up", "step_speedup_vs_dense", _x)),
        note=lambda p: "; ".join(filter(None, [", ".join(
            f"{k} = {_plain(p[k])}" for k in ("task_batch", "task_weight", "mixed_lengths",
                                              "digits") if k in p), p.get("note")])) or None),
}


def spec_for(name: str) -> TableSpec | None:
  """The spec of a benchmark name, or of its longest known prefix ('s2_experiments_passkey' ->
  's2_experiments': a tagged run of the same benchmark)."""
  for key in sorted(SPECS, key=len, reverse=True):
    if name == key or name.startswith(key + "_"):
      return SPECS[key]
  return None


def table_rows(payload: dict) -> list[dict]:
  """The rows of a results payload: `rows`, else `summary`, else one row per entry of each
  {section: {variant: {...}}} mapping (with `part` and `variant` keys)."""
  rows = payload.get("rows") or payload.get("summary")
  if rows is None:
    rows = [{"part": part, "variant": name, **vals}
            for part, section in payload.items() if isinstance(section, dict)
            and section and all(isinstance(v, dict) for v in section.values())
            for name, vals in section.items()]
  return [r for r in rows if isinstance(r, dict)]


def _is_scalar(v: Any) -> bool:
  if isinstance(v, (list, tuple)):
    return len(v) <= 8 and all(isinstance(x, (int, float, str, bool)) for x in v)
  return v is None or isinstance(v, (int, float, str, bool))


def _generic_spec(payload: dict) -> TableSpec:
  """Every scalar column of the rows, in order of first appearance; top-level scalars as a note."""
  keys: dict[str, None] = {}
  for row in table_rows(payload):
    for k, v in row.items():
      if _is_scalar(v):
        keys.setdefault(k)
  extras = {k: v for k, v in payload.items()
            if k not in ("name", "environment", "rows", "summary") and _is_scalar(v)}
  note = ", ".join(f"{k} = {_plain(v)}" for k, v in extras.items()) or None
  return TableSpec(columns=tuple((k, k, _plain) for k in keys), note=lambda p: note)


# Tables -------------------------------------------------------------------------------------------

def environment_line(env: dict) -> str:
  """'NVIDIA H200, JAX 0.11.2, commit 7e6ddea1, 2026-11-26' from a results file's environment."""
  commit = str(env.get("commit", "unknown"))
  sha, dirty = commit.removesuffix("+dirty"), commit.endswith("+dirty")
  date = str(env["time"])[:10] if env.get("time") else "unknown date"
  return (f"{env.get('device', 'unknown device')}, JAX {env.get('jax', '?')}, "
          f"commit {sha[:8]}{'+dirty' if dirty else ''}, {date}")


def render_table(payload: dict) -> str:
  """One results payload {name, environment, rows, ...} -> a markdown table and its footer."""
  spec = spec_for(payload.get("name", "")) or _generic_spec(payload)
  rows = [r for r in (spec.rows or table_rows)(payload) if spec.keep(r)]
  cols = [c for c in spec.columns if any(c[1] in r for r in rows)]
  lines = []
  if cols:
    lines.append("| " + " | ".join(h for h, _, _ in cols) + " |")
    # Text columns align left, numbers right.
    text = [all(isinstance(r[k], str) for r in rows if r.get(k) is not None) for _, k, _ in cols]
    lines.append("|" + "|".join(" --- " if t else " ---: " for t in text) + "|")
    for r in rows:
      cells = [MISSING if r.get(k) is None else fmt(r[k]) for _, k, fmt in cols]
      lines.append("| " + " | ".join(cells) + " |")
  else:
    lines.append("(no rows)")
  lines += ["", environment_line(payload.get("environment", {})) + "."]
  note = spec.note(payload)
  if note:
    lines += ["", note]
  return "\n".join(lines)


def load_results(results_dir: str | Path) -> dict[str, dict]:
  """{file stem: payload} for every results/*.json, sorted by stem."""
  out = {}
  for path in sorted(Path(results_dir).glob("*.json")):
    payload = json.loads(path.read_text())
    if isinstance(payload, dict):
      payload.setdefault("name", path.stem.rsplit("_", 1)[0])
      out[path.stem] = payload
  return out


def render_tables(results_dir: str | Path) -> dict[str, str]:
  """{file stem, e.g. 'train_gpu': markdown table with its environment line} for results/*.json,
  and 'targets': the issues' targets against those files (experiments.targets), when any of
  the files it reads is there."""
  from experiments.targets import TARGETS, render_targets
  payloads = load_results(results_dir)
  tables = {stem: render_table(p) for stem, p in payloads.items()}
  if any(s in payloads for t in TARGETS for s in t.sources):
    tables["targets"] = render_targets(payloads)
  return tables


# README -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReadmeUpdate:
  """What update_readme did."""

  changed: bool  # the README text differs from the regenerated one
  updated: list[str]  # markers whose tables were (re)written
  no_file: list[str]  # markers with no results file (left as they were)
  no_marker: list[str]  # results files with no marker in the README


def fill_markers(text: str, tables: dict[str, str]) -> tuple[str, list[str], list[str]]:
  """Replaces the body of every results marker that has a table. -> (text, updated, no_file)."""
  begins = BEGIN.findall(text)
  closed = [m.group("name") for m in MARKER.finditer(text)]
  unclosed = sorted(set(begins) - set(closed))
  if unclosed or len(begins) != len(closed):
    raise ValueError(f"results markers without a matching end: {unclosed or begins}")
  updated, no_file = [], []

  def sub(m: re.Match) -> str:
    name = m.group("name")
    if name not in tables:
      no_file.append(name)
      return m.group(0)
    updated.append(name)
    return (f"<!-- results:{name}:begin -->\n{tables[name]}\n<!-- results:{name}:end -->")

  return MARKER.sub(sub, text), updated, no_file


def update_readme(readme_path: str | Path, results_dir: str | Path, *,
                  write: bool = True) -> ReadmeUpdate:
  """Rewrites the tables between the results markers of a README; everything else is kept.

  Args:
    readme_path: the markdown file holding `<!-- results:NAME:begin/end -->` markers.
    results_dir: the folder of results JSON files; NAME is a file's stem, e.g. 'train_gpu'.
    write: False only compares (for --check).
  Returns:
    a ReadmeUpdate: whether the text changed, which markers were filled, which markers had no
    file and which files had no marker.
  """
  path = Path(readme_path)
  text = path.read_text()
  tables = render_tables(results_dir)
  new, updated, no_file = fill_markers(text, tables)
  no_marker = sorted(set(tables) - {m.group("name") for m in MARKER.finditer(text)}
                     - {"targets"})  # a README may leave the targets table out
  if write and new != text:
    path.write_text(new)
  return ReadmeUpdate(changed=new != text, updated=updated, no_file=no_file, no_marker=no_marker)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--readme", default="README.md", help="markdown file with results markers")
  parser.add_argument("--results", default="results", help="folder of results JSON files")
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if the README's tables are out of date")
  parser.add_argument("--print", dest="print_tables", action="store_true",
                      help="print every table with its marker name; leave the README alone")
  args = parser.parse_args(argv)
  if args.print_tables:
    for name, table in render_tables(args.results).items():
      print(f"<!-- results:{name}:begin -->\n{table}\n<!-- results:{name}:end -->\n")
    return 0
  if not Path(args.readme).is_file():
    print(f"error: {args.readme} not found", file=sys.stderr)
    return 2
  report = update_readme(args.readme, args.results, write=not args.check)
  for name in report.no_file:
    print(f"warning: marker '{name}' in {args.readme} has no {args.results}/{name}.json",
          file=sys.stderr)
  for name in report.no_marker:
    print(f"warning: {args.results}/{name}.json has no marker in {args.readme} "
          f"(add <!-- results:{name}:begin --> ... <!-- results:{name}:end -->)", file=sys.stderr)
  if args.check:
    if report.changed:
      print(f"{args.readme} is out of date: run python -m experiments report", file=sys.stderr)
      return 1
    print(f"{args.readme} is up to date ({len(report.updated)} tables)")
    return 0
  state = "updated" if report.changed else "already up to date"
  print(f"{args.readme} {state}: {', '.join(report.updated) or 'no tables'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
