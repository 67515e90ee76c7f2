"""Tests for experiments/targets.py: the targets table from fabricated and from the shipped
results files."""

import json
from pathlib import Path

from experiments import report, targets
from experiments.targets import TARGETS, Target, render_targets

ENV = {"device": "NVIDIA H200", "backend": "gpu", "jax": "0.11.2",
       "commit": "0123456789abcdef0123", "time": "2026-12-03T09:41:09+00:00"}
RESULTS = Path(__file__).resolve().parents[2] / "results"


def _paged(*speedups):
  return {"name": "paged_speed", "environment": ENV, "rows": [
      {"page_size": 16 * 4 ** i, "shared_prefix_speedup": s, "paged_over_contiguous_speed": 1.1}
      for i, s in enumerate(speedups)]}


def _row(table: str, what: str) -> list[str]:
  line = next(ln for ln in table.splitlines() if ln.startswith(f"| {what} |"))
  return [c.strip() for c in line.strip("|").split("|")]


def test_met_and_not_met_read_off_the_rows():
  shared = "shared-prefix decode attention vs per-sequence paged, 64 groups x 16, 2K prefix"
  table = render_targets({"paged_speed_gpu": _paged(3.2, 2.9)})
  _, asked, reached, met, by = _row(table, shared)
  assert (asked, reached, met) == ("≥ 3x", "3.20x (page 16), 2.90x (page 64)", "no")
  assert by == "paged_speed_gpu: NVIDIA H200, JAX 0.11.2, commit 01234567, 2026-12-03"
  assert _row(render_targets({"paged_speed_gpu": _paged(3.2, 3.0)}), shared)[3] == "**yes**"


def test_missing_and_unreadable_files_say_so():
  table = render_targets({"paged_speed_gpu": {"environment": ENV, "rows": [{"page_size": 16}]}})
  row = _row(table, "training MFU, `base`, bf16")
  assert row[2:4] == ["not measured", "–"] and row[4] == "no results/train_gpu.json"
  reached = _row(table, "paged decode kernel vs the contiguous one, by page size")[2]
  assert reached.startswith("unreadable (KeyError")


def test_untested_when_the_condition_is_not_reached():
  t = Target("x", "y", ("a_gpu",), lambda p: "r", lambda p: None)
  assert _row(render_targets({"a_gpu": {"environment": ENV}}, [t]), "x")[3] == "untested"


def _verdict(**fails):
  """An s2_claims retrieval payload whose hybrids fail `fails[v]` = (cells seed 0, seed 1)."""
  hyb = {v: {"per_seed": {str(s): {"dense_cells_99": 20, "cells": 20,
                                   "failed_cells": [[0.5, 512]] * n} for s, n in enumerate(f)},
             "outcome": "not confirmed" if any(f) else "confirmed"} for v, f in fails.items()}
  return {"name": "s2_retrieval", "environment": ENV, "runs": [], "verdict": {"hybrids": hyb}}


def test_s2_retrieval_needs_both_hybrids_on_both_seeds():
  what = next(t.what for t in TARGETS if t.sources == ("s2_retrieval_gpu",))
  ok = _verdict(sssd=(0, 0), sdsd=(0, 0), ssss=(4, 1))
  _, _, reached, met, _ = _row(render_targets({"s2_retrieval_gpu": ok}), what)
  assert met == "**yes**"  # all-S2 is reported, not part of the target
  assert reached == ("SSSD: 0 / 0 cells below; SDSD: 0 / 0 cells below; all-S2 (SSSS): 4 / 1 "
                     "cells below (seed 0 / 1)")
  bad = _verdict(sssd=(0, 0), sdsd=(0, 2))
  assert _row(render_targets({"s2_retrieval_gpu": bad}), what)[3] == "no"


def test_every_target_reads_the_shipped_results():
  """A results file whose layout changed makes its target unreadable: caught here."""
  payloads = report.load_results(RESULTS)
  table = render_targets(payloads)
  for t in TARGETS:
    assert any(s in payloads for s in t.sources), t.what
    assert "unreadable" not in _row(table, t.what)[2], t.what


def test_report_writes_the_targets_marker(tmp_path):
  d = tmp_path / "results"
  d.mkdir()
  (d / "paged_speed_gpu.json").write_text(json.dumps(_paged(3.5)))
  readme = tmp_path / "README.md"
  readme.write_text("x\n<!-- results:targets:begin -->\n<!-- results:targets:end -->\n")
  out = report.update_readme(readme, d)
  assert "targets" in out.updated and "3.50x (page 16)" in readme.read_text()
  assert targets.TARGETS  # the registry the table is built from
