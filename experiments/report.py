"""README result tables generated from the benchmark JSON files under results/, never typed by hand.

Each `results/<name>_<backend>.json` (see experiments/results.py) becomes one markdown table,
followed by a line naming the device, JAX version, commit and date. In the README a table lives
between `<!-- results:train_gpu:begin -->` and `<!-- results:train_gpu:end -->` (the file stem).

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


def _train_note(p: dict) -> str | None:
  peak = p.get("peak_tflops")
  return None if peak is None else f"MFU against a peak of {peak:g} TFLOP/s."


def _decode_note(p: dict) -> str | None:
  bw = p.get("copy_bandwidth_GBps")
  if bw is None:
    return None
  return (f"Roofline step: bytes of weights + KV attended, over the measured copy bandwidth "
          f"({bw:,.0f} GB/s).")


SPECS: dict[str, TableSpec] = {
    "train": TableSpec(
        columns=(("preset", "preset", _plain), ("chains", "chains", _plain),
                 ("params", "params", _count), ("batch", "batch", _plain),
                 ("seq len", "seq_len", _plain), ("dtype", "dtype", _plain),
                 ("step ms", "step_ms", _ms), ("tokens/s", "tokens_per_s", _rate),
                 ("MFU", "mfu", _pct)),
        note=_train_note),
    "decode": TableSpec(
        columns=(("preset", "preset", _plain), ("params", "params", _count),
                 ("batch", "batch", _plain), ("prompt", "prompt", _plain),
                 ("new tokens", "new_tokens", _plain), ("step ms", "step_ms", _ms),
                 ("roofline ms", "roofline_step_ms", _ms), ("tokens/s", "tokens_per_s", _rate),
                 ("% of roofline", "roofline_fraction", _pct)),
        note=_decode_note),
}


def _is_scalar(v: Any) -> bool:
  if isinstance(v, (list, tuple)):
    return len(v) <= 8 and all(isinstance(x, (int, float, str, bool)) for x in v)
  return v is None or isinstance(v, (int, float, str, bool))


def _generic_spec(payload: dict) -> TableSpec:
  """Every scalar column of the rows, in order of first appearance; top-level scalars as a note."""
  keys: dict[str, None] = {}
  for row in payload.get("rows", []):
    for k, v in row.items():
      if _is_scalar(v):
        keys.setdefault(k)
  extras = {k: v for k, v in payload.items()
            if k not in ("name", "environment", "rows") and _is_scalar(v)}
  note = ", ".join(f"{k} = {_plain(v)}" for k, v in extras.items()) or None
  return TableSpec(columns=tuple((k, k, _plain) for k in keys), note=lambda p: note)


# Tables -------------------------------------------------------------------------------------------

def environment_line(env: dict) -> str:
  """'NVIDIA H200, JAX 0.11.2, commit 7e6ddea1, 2026-11-26' from a results file's environment."""
  commit = str(env.get("commit", "unknown"))
  sha, dirty = commit.removesuffix("+dirty"), commit.endswith("+dirty")
  date = str(env.get("time", "unknown date"))[:10]
  return (f"{env.get('device', 'unknown device')}, JAX {env.get('jax', '?')}, "
          f"commit {sha[:8]}{'+dirty' if dirty else ''}, {date}")


def render_table(payload: dict) -> str:
  """One results payload {name, environment, rows, ...} -> a markdown table and its footer."""
  rows = [r for r in payload.get("rows", []) if isinstance(r, dict)]
  spec = SPECS.get(payload.get("name", "")) or _generic_spec(payload)
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
  """{file stem, e.g. 'train_gpu': markdown table with its environment line} for results/*.json."""
  return {stem: render_table(p) for stem, p in load_results(results_dir).items()}


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
  no_marker = sorted(set(tables) - {m.group("name") for m in MARKER.finditer(text)})
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
