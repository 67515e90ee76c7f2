"""bench search at toy size: a quick policy and PRM, every method, one results row each with the
accuracies, KV pages and speed; bad settings are one-line errors."""

import json

import pytest

from experiments import bench_search


def test_quick_bench_runs_every_method(tmp_path):
  res = bench_search.main(["--quick", "--out", str(tmp_path), "--widths", "2", "--n", "1",
                           "--children", "2", "--max-depth", "4", "--max-step-tokens", "8",
                           "--lambda-b", "2.0"])
  methods = [r["method"] for r in res["rows"]]
  assert methods == ["best_of_n", "beam", "dvts", "rebase", "ets", "ets"]
  for r in res["rows"]:
    assert 0.0 <= r["accuracy_vote"] <= r["pass_at_n"] <= 1.0
    assert r["peak_pages"] >= r["mean_pages"] > 0 and r["problems_per_s"] > 0
    # Compile time is measured apart and left out of the rate.
    assert r["compile_s"] >= 0 and r["problems_per_s"] >= r["problems_per_s_with_compile"]
  assert res["rows"][0]["compile_s"] > 0  # the first cell compiles the policy's shapes
  assert res["rows"][-1]["sweep"] == "lambda_b=2.0"
  assert 0.0 <= res["greedy_accuracy"] <= 1.0
  saved = json.loads((tmp_path / "search_cpu.json").read_text())
  assert len(saved["rows"]) == 6 and saved["plots"] == ["search_cpu.png"]


def test_budgeted_bench_searches_problems_side_by_side(tmp_path):
  res = bench_search.main(["--quick", "--out", str(tmp_path), "--widths", "2", "--n", "3",
                           "--children", "2", "--max-depth", "3", "--max-step-tokens", "8",
                           "--methods", "rebase", "ets", "--kv-budget", "512",
                           "--ets-lambda-b", "2.0"])
  assert res["kv_budget"] == 512 and res["ets_lambda_b"] == 2.0
  # The problems follow the training run's settings (the quick preset's 3 numbers).
  assert res["problem_spec"]["n_numbers"] == 3
  for r in res["rows"]:
    assert r["pool_pages"] == 512 * 2 // 16 and r["pool_peak_pages"] <= r["pool_pages"]
    assert 1 <= r["mean_active"] <= r["peak_active"] <= 3 and r["rounds"] >= 1
    assert r["peak_pages"] >= r["mean_pages"] > 0 and r["problems_per_s"] > 0


def test_bad_settings_are_one_line_errors():
  with pytest.raises(SystemExit, match="--model"):
    bench_search.main([])
  with pytest.raises(SystemExit, match="lambdas"):
    bench_search.main(["--quick", "--lambda-b", "-1"])
  with pytest.raises(SystemExit, match="kv-budget"):
    bench_search.main(["--quick", "--kv-budget", "0"])
  with pytest.raises(SystemExit, match="--workers must be >= 1, got 0"):
    bench_search.main(["--quick", "--workers", "0"])
  with pytest.raises(ValueError, match="unknown search method"):
    bench_search.main(["--quick", "--methods", "mcts"])
