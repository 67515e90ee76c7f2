"""Tests for experiments/report.py: tables from fabricated results, README markers, --check."""

import json

import pytest

from experiments import report

ENV = {"device": "NVIDIA H200", "backend": "gpu", "jax": "0.11.2", "flax": "0.12.10",
       "commit": "0123456789abcdef0123", "time": "2026-11-26T07:22:29+00:00"}
TRAIN = {"name": "train", "environment": ENV, "peak_tflops": 989.0, "rows": [
    {"preset": "base", "chains": [16, 16], "batch": 32, "seq_len": 1024, "dtype": "bfloat16",
     "params": 103041792, "step_ms": 91.41048, "tokens_per_s": 358470.93, "mfu": 0.24461}]}
DECODE = {"name": "decode", "environment": {**ENV, "commit": "fedcba9876543210+dirty"},
          "copy_bandwidth_GBps": 4191.3, "rows": [
              {"preset": "large", "batch": 1, "params": 1036085248, "step_ms": 1.6230954,
               "roofline_step_ms": 0.5026485, "tokens_per_s": 616.1067,
               "roofline_fraction": 0.309685}]}
ATTN = {"name": "attention", "environment": {**ENV, "backend": "cpu", "device": "cpu"},
        "config": {"seed": 0}, "seed": 3, "rows": [
            {"impl": "cudnn", "T": 8192, "fwd_ms": 1.23456, "check": {"ok": True}},
            {"impl": "s2", "T": 8192, "fwd_ms": 0.5, "bwd_ms": 2.0}]}


@pytest.fixture
def results_dir(tmp_path):
  d = tmp_path / "results"
  d.mkdir()
  for stem, payload in (("train_gpu", TRAIN), ("decode_gpu", DECODE), ("attention_cpu", ATTN)):
    (d / f"{stem}.json").write_text(json.dumps(payload))
  return d


def test_render_tables_formats_numbers(results_dir):
  tables = report.render_tables(results_dir)
  assert sorted(tables) == ["attention_cpu", "decode_gpu", "targets", "train_gpu"]
  train = tables["train_gpu"]
  for cell in ("| base | 16,16 | 103M | 32 | 1024 | bfloat16 | 91.41 | 358,471 | 24.5% |",
               "NVIDIA H200, JAX 0.11.2, commit 01234567, 2026-11-26.", "989 TFLOP/s"):
    assert cell in train
  decode = tables["decode_gpu"]
  for cell in ("| large | 1.04B | 1 | 1.62 | 0.503 | 616 | 31.0% |", "commit fedcba98+dirty",
               "4,191 GB/s"):
    assert cell in decode


def test_generic_table_prints_scalar_columns(results_dir):
  table = report.render_tables(results_dir)["attention_cpu"]
  lines = table.splitlines()
  assert lines[0] == "| impl | T | fwd_ms | bwd_ms |"  # the nested 'check' dict is left out
  assert lines[1] == "| --- | ---: | ---: | ---: |"
  assert lines[2] == "| cudnn | 8192 | 1.235 | – |"
  assert lines[3] == "| s2 | 8192 | 0.5 | 2 |"
  assert "cpu, JAX 0.11.2, commit 01234567, 2026-11-26." in table
  assert "seed = 3" in table


README = """# Project

Intro text stays.

<!-- results:train_gpu:begin -->
old train table
<!-- results:train_gpu:end -->

Between the tables.

<!-- results:decode_gpu:begin --><!-- results:decode_gpu:end -->

<!-- results:missing_gpu:begin -->
kept as is
<!-- results:missing_gpu:end -->
Tail.
"""


def test_update_readme_replaces_only_between_markers(tmp_path, results_dir):
  readme = tmp_path / "README.md"
  readme.write_text(README)
  result = report.update_readme(readme, results_dir)
  assert result.changed
  assert result.updated == ["train_gpu", "decode_gpu"]
  assert result.no_file == ["missing_gpu"]
  assert result.no_marker == ["attention_cpu"]
  text = readme.read_text()
  assert "old train table" not in text
  assert "358,471" in text and "31.0%" in text
  tables = report.render_tables(results_dir)
  # Removing each table's body gives back the original text outside the markers.
  stripped = text.replace(tables["train_gpu"], "old train table")
  stripped = stripped.replace("begin -->\n" + tables["decode_gpu"] + "\n<!--", "begin --><!--")
  assert stripped == README
  # Idempotent: a second run changes nothing.
  again = report.update_readme(readme, results_dir)
  assert not again.changed and readme.read_text() == text


def test_unclosed_marker_raises(tmp_path, results_dir):
  readme = tmp_path / "README.md"
  readme.write_text("<!-- results:train_gpu:begin -->\nno end\n")
  with pytest.raises(ValueError, match="train_gpu"):
    report.update_readme(readme, results_dir)


def test_check_detects_stale_readme(tmp_path, results_dir, capsys):
  readme = tmp_path / "README.md"
  readme.write_text(README)
  args = ["--readme", str(readme), "--results", str(results_dir)]
  assert report.main([*args, "--check"]) == 1
  assert readme.read_text() == README  # --check writes nothing
  assert report.main(args) == 0
  assert report.main([*args, "--check"]) == 0
  # A new measurement makes it stale again.
  (results_dir / "train_gpu.json").write_text(json.dumps(
      {**TRAIN, "rows": [{**TRAIN["rows"][0], "step_ms": 50.0}]}))
  assert report.main([*args, "--check"]) == 1
  assert "out of date" in capsys.readouterr().err


def test_section_payload_rows_and_tagged_spec():
  """s2_bench-style {part: {variant: {...}}} payloads become rows; a tagged name uses its base
  benchmark's spec and its row filter."""
  bench = {"name": "s2_bench_v16", "environment": ENV, "seq": 32768, "stride": 16,
           "train": {"dense": {"step_s": 0.1, "speedup_vs_dense": 1.0},
                     "s2": {"step_s": 0.04, "speedup_vs_dense": 2.5}},
           "decode": {"s2": {"decode_ms_per_token": 0.7, "cache_bytes": 2**21}}}
  rows = report.table_rows(bench)
  assert [(r["part"], r["variant"]) for r in rows] == [("train", "dense"), ("train", "s2"),
                                                        ("decode", "s2")]
  table = report.render_table(bench)
  assert "| train | s2 | 40.00 | – | – | 2.50x |" in table  # columns no row has are dropped
  assert "| decode | s2 | – | 0.700 | 2.0 | – |" in table
  assert report.spec_for("s2_experiments_passkey") is report.SPECS["s2_experiments"]
  assert report.spec_for("s2_experimentsX") is None
  cache = {"name": "s2_cache", "environment": ENV, "rows": [
      {"variant": "v8", "tokens": n, "dense_bytes": 2**20, "s2_bytes": 2**18, "ratio": 4.0}
      for n in (8192, 32768)]}
  assert report.render_table(cache).count("| v8 |") == 1  # only the 32K row is shown
  summary = {"name": "s2_experiments", "environment": ENV, "summary": [
      {"config": "s2_dense", "val_loss": 2.5, "passkey_mean": 0.5}]}
  assert "| s2_dense | 2.5 | 50.0% |" in report.render_table(summary)


def test_commit_from_environment_wins(monkeypatch):
  from experiments import results
  monkeypatch.setenv("EFFLLM_COMMIT", "abc1234")
  assert results.git_commit() == "abc1234"
  monkeypatch.delenv("EFFLLM_COMMIT")
  assert results.git_commit() != "abc1234"
