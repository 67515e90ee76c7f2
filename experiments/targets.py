"""The issues' targets against what the results files hold: the README's targets table, generated.

Each Target names what was asked, the results files (stems under results/) that measure it, and
two functions of those payloads: the text of what was reached and whether the target is met
(None: the files cannot tell, e.g. a comparison whose condition was never reached). A target
whose files are missing reads "not measured". `python -m experiments report` writes the table
between `<!-- results:targets:begin -->` and `<!-- results:targets:end -->`; every row names the
device, JAX version and commit of each file it reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

# report imports this module inside render_tables, so this import closes no cycle at load time.
from experiments.report import _pct, _x, environment_line, press_rows

Payloads = dict[str, dict]


@dataclasses.dataclass(frozen=True)
class Target:
  """One target: `what` and `asked` as the issue states them, `sources` the results stems it is
  read from, `reached(payloads) -> str` and `met(payloads) -> bool | None`."""

  what: str
  asked: str
  sources: tuple[str, ...]
  reached: Callable[[Payloads], str]
  met: Callable[[Payloads], bool | None]


# Readers ------------------------------------------------------------------------------------------

def _rows(p: dict, key: str = "rows") -> list[dict]:
  return [r for r in p.get(key) or [] if isinstance(r, dict)]


def _span(vals: Sequence[float], fmt: Callable[[float], str]) -> str:
  lo, hi = fmt(min(vals)), fmt(max(vals))
  return lo if lo == hi else f"{lo} to {hi}"


def _train_mfu(p: Payloads) -> list[float]:
  return [r["mfu"] for r in _rows(p["train_gpu"])
          if r.get("preset") == "base" and r.get("dtype") == "bfloat16" and "mfu" in r]


def _decode_fracs(p: Payloads) -> list[float | None]:
  rows = [r for r in _rows(p["decode_gpu"]) if r.get("decode_attn") == "auto"]

  def frac(preset, batch):
    hit = [r["roofline_fraction"] for r in rows if r.get("preset") == preset
           and r.get("batch") == batch]
    return hit[0] if hit else None
  return [frac("large", 1), frac("base", 1), frac("base", 32)]


def _decode_s2(p: Payloads) -> dict:
  return p["s2_decode_gpu"].get("decode", {})


def _colm_steps(p: Payloads) -> dict[tuple, float]:
  return {tuple(r["chains"]): r["vs_baseline"] for r in _rows(p["colm_train_gpu"])
          if r.get("variant") != "baseline" and "vs_baseline" in r}


def _air(p: Payloads, chains: tuple) -> list[tuple[int, float]]:
  return [(r["prompt_tokens"], r["speedup"]) for r in _rows(p["colm_prefill_gpu"])
          if tuple(r.get("chains", ())) == chains]


def _progressive_pass(p: Payloads) -> dict[str, dict[str, bool]]:
  """Per progressive run: reaches scratch's final loss within F, beats chain 1 alone."""
  return p["colm_progressive_flops_gpu"]["pass"]


def _air_longest(p: Payloads, chains: tuple) -> float:
  """The speed-up at the longest prompt measured (0 if none): the claim is about long prompts,
  where chain 1's share of the attention sets the ceiling."""
  rows = _air(p, chains)
  return max(rows)[1] if rows else 0.0


def _attention(p: Payloads) -> dict[tuple[str, int], dict]:
  return {(r["impl"], r["T"]): r for r in _rows(p["attention_gpu"])}


def _dense_ratio(p: Payloads, key: str) -> list[float]:
  a = _attention(p)
  return [a[("ours_dense_b64", t)][key] / a[("cudnn_dense", t)][key] for impl, t in a
          if impl == "cudnn_dense" and ("ours_dense_b64", t) in a]


def _s2_over_ideal(p: Payloads) -> list[float]:
  """Forward + backward speed-up of each S2 stride over cuDNN dense, over its FLOP ratio, at
  T >= 32K."""
  a = _attention(p)
  out = []
  for (impl, t), r in a.items():
    dense = a.get(("cudnn_dense", t))
    if impl.startswith("ours_s2") and t >= 32768 and dense:
      out.append((dense["fb_ms"] / r["fb_ms"]) / (dense["fwd_gflop"] / r["fwd_gflop"]))
  return out


def _dkernel(p: Payloads) -> list[tuple[str, int, float, float]]:
  """(stride, T, DKernel's forward ms over ours, backward likewise): the ratios bench
  attention's summary took from DKernel's rows of the same run (--peer dkernel)."""
  return [(s["impl"][len("ours_s2_"):], s["T"], s["fwd_vs_dkernel"], s["bwd_vs_dkernel"])
          for s in _rows(p["attention_gpu"], "summary") if "fwd_vs_dkernel" in s]


def _dkernel_text(p: Payloads) -> str:
  rows = _dkernel(p)
  if not rows:
    return "no side-by-side run in the file (bench attention --peer dkernel writes one)"
  return ", ".join(f"{vs} {t // 1024}K: {f:.2f}x / {b:.2f}x" for vs, t, f, b in rows)


def _hybrid(p: Payloads) -> list[tuple[int, float]]:
  return [(p[s].get("stride"), p[s]["train"]["s2_hybrid4"]["speedup_vs_dense"])
          for s in ("s2_bench_gpu", "s2_bench_v16_gpu") if s in p]


def _s2_retrieval_text(p: dict) -> str:
  """'sssd 0 / 0 cells below, sdsd ...; all-S2 4 / 1' (per seed) from an s2_claims verdict."""
  hyb = p["verdict"]["hybrids"]
  return "; ".join(f"{'all-S2 (SSSS)' if v == 'ssss' else v.upper()}: " + " / ".join(
      str(len(c["failed_cells"])) for c in hyb[v]["per_seed"].values()) + " cells below"
      for v in ("sssd", "sdsd", "ssss") if v in hyb) + " (seed 0 / 1)"


def _s2_retrieval_met(p: dict) -> bool | None:
  outs = [p["verdict"]["hybrids"].get(v, {}).get("outcome") for v in ("sssd", "sdsd")]
  return None if None in outs or "inconclusive" in outs else all(o == "confirmed" for o in outs)


def _s2_cache(p: Payloads, variant: str) -> float | None:
  hit = [r["ratio"] for r in _rows(p["s2_cache_gpu"]) if r.get("variant") == variant
         and r.get("tokens") == 32768]
  return hit[0] if hit else None


def _mpc(p: Payloads) -> dict[tuple[str, float], tuple[list[float], list[float]]]:
  """{(protocol, static): (bytes x, LAN x) over T >= 2K} of MPCache against the optimised full
  attention."""
  out: dict = {}
  for r in _rows(p["mpc_cpu"]):
    if r.get("method") == "mpcache (cluster max)" and r.get("T", 0) >= 2048:
      b, lan = out.setdefault((r["protocol"], r["static"]), ([], []))
      b.append(r["bytes_x_vs_deferred"])
      lan.append(r["lan_x_vs_deferred"])
  return out


def _mpc_text(p: Payloads) -> str:
  parts = []
  for proto in sorted({k[0] for k in _mpc(p)}):
    b = [v for (pr, _), (bs, _) in _mpc(p).items() if pr == proto for v in bs]
    lan = [v for (pr, _), (_, ls) in _mpc(p).items() if pr == proto for v in ls]
    parts.append(f"{proto} {_span(b, _x)} bytes / {_span(lan, _x)} LAN")
  return "; ".join(parts)


def _mpc_met(p: Payloads) -> bool:
  """Met when one static budget reaches both ratios at every T >= 2K under every protocol."""
  m = _mpc(p)
  protos = {k[0] for k in m}
  return any(all((pr, st) in m and min(m[pr, st][0]) >= 3.4 and min(m[pr, st][1]) >= 1.8
                 for pr in protos) for st in {k[1] for k in m})


def _press(p: Payloads, stem: str) -> list[dict]:
  return press_rows(p[stem])


def _score(rows, method, budget, mode="query-aware", key="score"):
  hit = [r[key] for r in rows if r.get("mode") == mode and r.get("method") == method
         and abs(r.get("budget", -1) - budget) < 1e-6 and r.get(key) is not None]
  return hit[0] if hit else None


def _mpcache_points(p: Payloads) -> list[tuple[str, float, float]]:
  rows = _press(p, "press_mpcache_gpu")
  full = _score(rows, "full", 1.0)
  return [(m, b, 100 * (_score(rows, m, b) - full)) for m in ("mpcache", "mpcache-dyn")
          for b in (0.5, 0.25) if _score(rows, m, b) is not None]


def _windowkv_share(p: Payloads) -> list[tuple[str, float]]:
  out = []
  for stem, label in (("press_gpu", "paper defaults"), ("press_windowkv_flat_gpu", "flat")):
    if stem in p:
      v = _score(_press(p, stem), "windowkv", 0.12, key="share of full")
      if v is not None:
        out.append((label, v))
  return out


def _aggregation(p: Payloads) -> dict[str, dict[str, float]]:
  """{mode: {method: aggregation-family score at 12%}} for both modes."""
  rows = _press(p, "press_gpu")
  return {mode: {m: _score(rows, m, 0.12, mode, "aggregation")
                 for m in ("windowkv", "snapkv", "pyramidkv")}
          for mode in ("query-aware", "query-agnostic")}


def _aggregation_met(p: Payloads) -> bool:
  return all(a["windowkv"] > max(a["snapkv"], a["pyramidkv"])
             for a in _aggregation(p).values())


def _press_speed(p: Payloads) -> list[tuple[str, float]]:
  return [(r["mode"].split(":")[1].split(",")[0].strip(), r["speed-up"])
          for r in _press(p, "press_speed_gpu") if r.get("mode", "").startswith("speed")
          and r.get("method") == "windowkv" and "speed-up" in r]


def _search(p: Payloads, stem: str = "search_gpu") -> dict[tuple[int, str], dict]:
  return {(r["width"], r["method"]): r for r in _rows(p[stem]) if r.get("sweep") is None}


def _ets(p: Payloads, widths=(64, 256), stem: str = "search_gpu") -> list[dict]:
  s = _search(p, stem)
  return [{**s[(w, "ets")], "acc_delta": 100 * (s[(w, "ets")]["accuracy_vote"]
                                                - s[(w, "rebase")]["accuracy_vote"])}
          for w in widths if (w, "ets") in s and (w, "rebase") in s]


def _ets_targets(stem: str, how: str) -> list[Target]:
  """ETS's targets against REBASE as read from one `bench search` file (`how` it ran)."""
  def kv(p):
    return ", ".join(f"width {r['width']}: {_x(r['kv_x_vs_rebase'])}"
                     + (f" ({_x(r['kv_tokens_x_vs_rebase'])} in step tokens)"
                        if "kv_tokens_x_vs_rebase" in r and p[stem].get("page_size", 16) > 1
                        else "")
                     + f", {_x(r['speed_x_vs_rebase'])}, {r['acc_delta']:+.1f}"
                     for r in _ets(p, stem=stem))

  def kv_met(p):
    return bool(_ets(p, stem=stem)) and all(
        r["kv_x_vs_rebase"] >= 1.8 and r["speed_x_vs_rebase"] >= 1.4
        and abs(r["acc_delta"]) <= 1 for r in _ets(p, stem=stem))
  return [
      Target(f"ETS vs REBASE, widths 64 / 256, {how}: less KV (pages), problems/s, accuracy "
             "(points)", "≥ 1.8x, ≥ 1.4x, within 1 point", (stem,), kv, kv_met),
      Target(f"ETS's ILP share of the search's wall time, widths 16 / 64 / 256, {how}", "< 10%",
             (stem,),
             lambda p: _join([_search(p, stem).get((w, "ets"), {}).get("ilp_share")
                              for w in (16, 64, 256)], _pct),
             lambda p: all(r["ilp_share"] < 0.1 for r in _ets(p, (16, 64, 256), stem))),
  ]


_SEARCH_METHODS = ("best_of_n", "beam", "dvts", "rebase", "ets")


def _search_gain(p: Payloads, method: str, width: int = 64) -> float:
  return 100 * (_search(p)[(width, method)]["accuracy_vote"] - p["search_gpu"]["greedy_accuracy"])


def _paged(p: Payloads) -> list[dict]:
  return _rows(p["paged_speed_gpu"])


def _join(vals, fmt, sep=" / "):
  return sep.join("–" if v is None else fmt(v) for v in vals)


# The targets --------------------------------------------------------------------------------------

TARGETS: tuple[Target, ...] = (
    Target("training MFU, `base`, bf16", "≥ 45%", ("train_gpu",),
           lambda p: _span(_train_mfu(p), _pct), lambda p: max(_train_mfu(p)) >= 0.45),
    Target("decode, % of roofline: ≈1B b1 / `base` b1 / `base` b32", "≥ 50 / 25 / 40%",
           ("decode_gpu",), lambda p: _join(_decode_fracs(p), _pct),
           lambda p: all(f is not None and f >= t for f, t in
                         zip(_decode_fracs(p), (0.5, 0.25, 0.4)))),
    Target("dense decode at 32K, batch 8, `bench s2` shape", "≥ 40% of roofline",
           ("s2_decode_gpu",), lambda p: _pct(_decode_s2(p)["dense"]["roofline_fraction"]),
           lambda p: _decode_s2(p)["dense"]["roofline_fraction"] >= 0.4),
    Target("S2 per-KV-head decode speed-up over dense, of its ideal", "≥ 0.6",
           ("s2_decode_gpu",),
           lambda p: (lambda r: f"{r['speedup_over_ideal']:.2f} ({_x(r['speedup_vs_dense'])} "
                      f"of {_x(r['ideal_speedup'])})")(_decode_s2(p)["s2_per_kv_head"]),
           lambda p: _decode_s2(p)["s2_per_kv_head"]["speedup_over_ideal"] >= 0.6),
    Target("chunked prefill of 32K in 4K chunks vs one-shot", "≤ 1.3x", ("prefill_gpu",),
           lambda p: _span([r["ratio"] for r in _rows(p["prefill_gpu"])], _x),
           lambda p: max(r["ratio"] for r in _rows(p["prefill_gpu"])) <= 1.3),
    Target("CoLM train step vs parameter-matched baseline: (16,16) / (8,8,8,8)",
           "≤ 1.15x / ≤ 1.25x", ("colm_train_gpu",),
           lambda p: _join([_colm_steps(p).get((16, 16)), _colm_steps(p).get((8, 8, 8, 8))],
                           _x),
           lambda p: (_colm_steps(p).get((16, 16), 9) <= 1.15
                      and _colm_steps(p).get((8, 8, 8, 8), 9) <= 1.25)),
    Target("CoLM-Air prefill speed-up, (16,16)", "≥ 1.8x at the longest prompt",
           ("colm_prefill_gpu",),
           lambda p: ", ".join(f"{_x(s)} at {t // 1024}K" for t, s in _air(p, (16, 16))),
           lambda p: _air_longest(p, (16, 16)) >= 1.8),
    Target("CoLM-Air prefill speed-up, (8,8,8,8)", "≥ 3x at the longest prompt",
           ("colm_prefill_gpu",),
           lambda p: ", ".join(f"{_x(s)} at {t // 1024}K" for t, s in _air(p, (8, 8, 8, 8))),
           lambda p: _air_longest(p, (8, 8, 8, 8)) >= 3),
    Target("CoLM val loss vs the best-tuned baseline, equal parameters (python corpus)",
           "within 2% (each seed)", ("colm_parity_gpu", "colm_parity_seed1_gpu"),
           lambda p: "; ".join(f"seed {i}: " + ", ".join(f"{k} {100 * g:+.1f}%"
                                                         for k, g in p[n]["gaps"].items())
                               for i, n in enumerate(("colm_parity_gpu", "colm_parity_seed1_gpu"))),
           lambda p: all(all(p[n]["pass"].values())
                         for n in ("colm_parity_gpu", "colm_parity_seed1_gpu"))),
    Target("CoLM progressive (1 -> 2 chains) at equal FLOPs: reaches scratch within F; beats "
           "chain 1 alone", "both", ("colm_progressive_flops_gpu",),
           lambda p: "; ".join(f"{k.replace('progressive_', '')}: "
                               f"{v['reaches_scratch_within_budget']}, {v['beats_chain1_only']}"
                               for k, v in _progressive_pass(p).items()),
           lambda p: all(all(v.values()) for v in _progressive_pass(p).values())),
    Target("dense-layout block-sparse forward / backward, TFLOP/s over cuDNN dense",
           "≥ 0.75 / ≥ 0.65", ("attention_gpu",),
           lambda p: (f"{_span(_dense_ratio(p, 'fwd_tflops'), '{:.2f}'.format)} / "
                      f"{_span(_dense_ratio(p, 'bwd_tflops'), '{:.2f}'.format)}"),
           lambda p: (min(_dense_ratio(p, "fwd_tflops")) >= 0.75
                      and min(_dense_ratio(p, "bwd_tflops")) >= 0.65)),
    Target("S2 forward + backward speed-up over cuDNN dense at ≥ 32K, of the ideal (FLOP ratio)",
           "≥ 0.8", ("attention_gpu",),
           lambda p: _span(_s2_over_ideal(p), "{:.2f}".format),
           lambda p: min(_s2_over_ideal(p)) >= 0.8),
    Target("S2 kernels faster than DKernel (DKernel ms over ours), forward / backward",
           "> 1x at every size and stride", ("attention_gpu",), _dkernel_text,
           lambda p: (lambda r: None if not r else all(f > 1 and b > 1 for _, _, f, b in r))(
               _dkernel(p))),
    Target("S2 hybrid (1 dense layer in 4) train step at 32K, by vertical stride", "≥ 2x",
           ("s2_bench_gpu", "s2_bench_v16_gpu"),
           lambda p: ", ".join(f"{_x(s)} (stride {st})" for st, s in _hybrid(p)),
           lambda p: all(s >= 2 for _, s in _hybrid(p))),
    Target("S2 retrieval, synthetic passkey at 4K, trained to convergence (2 seeds): SSSD / "
           "SDSD ≥ 99% on every cell where dense is", "every cell, each seed",
           ("s2_retrieval_gpu",), lambda p: _s2_retrieval_text(p["s2_retrieval_gpu"]),
           lambda p: _s2_retrieval_met(p["s2_retrieval_gpu"])),
    Target("S2 retrieval, the suite's needle in corpus text at 4K (2 seeds): SSSD / SDSD ≥ 99% "
           "on every cell where dense is", "every cell, each seed",
           ("s2_retrieval_needle_gpu",),
           lambda p: _s2_retrieval_text(p["s2_retrieval_needle_gpu"]),
           lambda p: _s2_retrieval_met(p["s2_retrieval_needle_gpu"])),
    Target("S2 LM val loss vs dense, positions ≥ 0 / 512 / 2048 (python corpus, 2 seeds): SDSD, "
           "SSSD", "within 2%, or twice the seed spread", ("s2_quality_gpu",),
           lambda p: "; ".join(f"{v}: " + " / ".join(f"{100 * b['gap']:+.1f}%"
                                                     for b in x["buckets"].values())
                               for v, x in p["s2_quality_gpu"]["verdict"]["hybrids"].items()),
           lambda p: None if p["s2_quality_gpu"]["verdict"]["outcome"] == "inconclusive"
           else p["s2_quality_gpu"]["verdict"]["outcome"] == "confirmed"),
    Target("S2 decode cache at 32K, stride 8: per KV head / per query head", "≥ 4x smaller",
           ("s2_cache_gpu",),
           lambda p: _join([_s2_cache(p, "v8_per_kv_head"), _s2_cache(p, "v8_per_head")], _x),
           lambda p: (_s2_cache(p, "v8_per_kv_head") or 0) >= 4),
    Target("MPCache vs the optimised full MPC attention, T ≥ 2K (SPU simulator)",
           "≥ 3.4x bytes and ≥ 1.8x LAN, ABY3 and Cheetah", ("mpc_cpu",), _mpc_text, _mpc_met),
    Target("MPCache suite score vs the full cache, query-aware (points)", "within 2 points",
           ("press_mpcache_gpu",),
           lambda p: ", ".join(f"{'static' if m == 'mpcache' else 'static + dynamic'} "
                               f"{100 * b:.0f}%: {d:+.1f}" for m, b, d in _mpcache_points(p)),
           lambda p: any(m == "mpcache-dyn" and d >= -2 for m, _, d in _mpcache_points(p))),
    *_ets_targets("search_gpu", "each problem alone"),
    Target("search at width 64 over the policy's greedy accuracy (weighted vote, points)",
           "≥ +15 points", ("search_gpu",),
           lambda p: ", ".join(f"{m} {_search_gain(p, m):+.1f}" for m in _SEARCH_METHODS
                               if (64, m) in _search(p)),
           lambda p: any(_search_gain(p, m) >= 15 for m in _SEARCH_METHODS
                         if (64, m) in _search(p))),
    Target("paged decode kernel vs the contiguous one, by page size", "≥ 0.85x",
           ("paged_speed_gpu",),
           lambda p: ", ".join(f"{_x(r['paged_over_contiguous_speed'])} (page "
                               f"{r['page_size']})" for r in _paged(p)),
           lambda p: all(r["paged_over_contiguous_speed"] >= 0.85 for r in _paged(p))),
    Target("shared-prefix decode attention vs per-sequence paged, 64 groups x 16, 2K prefix",
           "≥ 3x", ("paged_speed_gpu",),
           lambda p: ", ".join(f"{_x(r['shared_prefix_speedup'])} (page {r['page_size']})"
                               for r in _paged(p)),
           lambda p: all(r["shared_prefix_speedup"] >= 3 for r in _paged(p))),
    Target("pages held under prefix sharing over the tree optimum", "within 2%",
           ("paged_memory_cpu",),
           lambda p: _span([r["over_optimum"] for r in _rows(p["paged_memory_cpu"])],
                           lambda v: f"+{100 * v:.2f}%"),
           lambda p: max(r["over_optimum"] for r in _rows(p["paged_memory_cpu"])) <= 0.02),
    Target("WindowKV at 12%: share of the full cache's suite score", "≥ 97%",
           ("press_gpu", "press_windowkv_flat_gpu"),
           lambda p: ", ".join(f"{_pct(v)} ({label})" for label, v in _windowkv_share(p)),
           lambda p: any(v >= 0.97 for _, v in _windowkv_share(p))),
    Target("WindowKV at 12% vs SnapKV and PyramidKV, aggregation families' score",
           "beats both", ("press_gpu",),
           lambda p: "; ".join(f"{mode}: " + ", ".join(f"{m} {v:.3f}" for m, v in a.items())
                               for mode, a in _aggregation(p).items()),
           _aggregation_met),
    Target("decode tokens/s at 12% vs the full cache, 32K, batch 8", "≥ 2x", ("press_speed_gpu",),
           lambda p: ", ".join(f"{_x(s)} ({m})" for m, s in _press_speed(p)),
           lambda p: bool(_press_speed(p)) and all(s >= 2 for _, s in _press_speed(p))),
)


def render_targets(payloads: Payloads, targets: Sequence[Target] = TARGETS) -> str:
  """The targets table: target | asked | reached | met | measured by (one line per file)."""
  lines = ["| target | asked | reached | met | measured by |", "| --- | --- | --- | --- | --- |"]
  for t in targets:
    have = {s: payloads[s] for s in t.sources if s in payloads}
    if not have:
      reached, met, by = "not measured", "–", f"no results/{t.sources[0]}.json"
    else:
      try:
        reached, ok = t.reached(have), t.met(have)
        met = "untested" if ok is None else "**yes**" if ok else "no"
      except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:
        reached, met = f"unreadable ({type(e).__name__}: {e})", "–"
      by = "; ".join(f"{s}: {environment_line(p.get('environment', {}))}"
                     for s, p in have.items())
    lines.append(f"| {t.what} | {t.asked} | {reached} | {met} | {by} |")
  return "\n".join(lines)
