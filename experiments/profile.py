"""Summarise a profiler trace: device time per HLO op category and the top ops.

    python -m experiments.profile results/prof_train.xplane.pb [--top 25]

Needs the `xprof` package (pip install xprof), which reads the .xplane.pb that
`--profile` of the benchmarks writes. The summary is what a first look at the trace needs:
where the device time goes, and how much of the wall time the device sat idle.
"""

from __future__ import annotations

import argparse
import collections
import json


def op_stats(path: str) -> list[dict]:
  """Rows of xprof's hlo_stats tool: one per HLO op, with category and self time (us)."""
  try:
    from xprof.convert import raw_to_tool_data
  except ImportError:
    raise SystemExit("reading traces needs xprof: pip install xprof") from None
  data, _ = raw_to_tool_data.xspace_to_tool_data([path], "hlo_stats", {})
  table = json.loads(data)
  cols = [c["id"] for c in table["cols"]]
  return [dict(zip(cols, [cell.get("v") for cell in row["c"]])) for row in table["rows"]]


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(prog="python -m experiments.profile")
  ap.add_argument("trace")
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args(argv)
  rows = op_stats(args.trace)
  total = sum(r["total_self_time"] for r in rows) or 1.0
  by_cat = collections.Counter()
  for r in rows:
    by_cat[r["category"]] += r["total_self_time"]
  print(f"device self time {total / 1e3:.1f} ms over {len(rows)} ops")
  for cat, t in by_cat.most_common():
    print(f"  {cat:28s} {t / 1e3:9.2f} ms  {100 * t / total:5.1f}%")
  print(f"\ntop {args.top} ops:")
  for r in sorted(rows, key=lambda r: -r["total_self_time"])[: args.top]:
    print(f"  {r['total_self_time'] / 1e3:8.2f} ms  x{int(r['occurrences']):<5d} "
          f"{r['category'][:18]:18s} {str(r['hlo_op_name'])[:40]:40s} "
          f"{str(r.get('tf_op_name') or '')[-60:]}")


if __name__ == "__main__":
  main()
