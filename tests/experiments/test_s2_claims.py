"""S2 claims (issue 18 items 2 and 3): layer codes, equal-token length buckets, position-bucket
losses, the two verdicts on hand-made rows, and both experiments end to end at toy size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import s2_claims as sc


def test_layer_codes_map_to_layer_specs():
  assert sc.layer_attn("SDSD", "s2:x") == ["s2:x", "auto", "s2:x", "auto"]
  assert list(sc.run_config("sssd", 3, sc.RETRIEVAL_QUICK, True).model_config().layer_attn) == (
      [sc.QUICK_S2_SPEC] * 3 + ["auto"])
  for bad in ("", "SXD", "sdsd"):
    with pytest.raises(ValueError, match="D and S"):
      sc.layer_attn(bad, "s2:x")


def test_retrieval_shapes_hold_equal_tokens():
  shapes = sc.retrieval_shapes(4096, 8)
  assert [n for _, n in shapes] == [512, 1024, 2048, 4096]
  assert {b * n for b, n in shapes} == {8 * 4096}


def test_bucket_losses_average_from_each_start():
  seed = 0
  print(f"seed {seed}")
  x = np.random.default_rng(seed).random(64)
  out = sc.bucket_losses(x, sc.buckets(64))
  assert list(out) == [">=0", ">=8", ">=32"]
  np.testing.assert_allclose([out[">=0"], out[">=8"], out[">=32"]],
                             [x.mean(), x[8:].mean(), x[32:].mean()])


def _ret(variant, seed, acc):
  return {"variant": variant, "seed": seed,
          "final": {"lengths": [8, 16], "depths": [0.1, 0.9], "accuracy": acc}}


def test_retrieval_verdict_names_failed_cells():
  good, dense = [[1.0, 1.0], [1.0, 0.5]], [[1.0, 1.0], [1.0, 0.5]]
  runs = [_ret("dense", 0, dense), _ret("sssd", 0, good),
          _ret("sdsd", 0, [[1.0, 0.98], [1.0, 1.0]])]
  v = sc.retrieval_verdict(runs)
  assert v["hybrids"]["sssd"]["outcome"] == "confirmed"
  assert v["hybrids"]["sdsd"]["per_seed"]["0"]["failed_cells"] == [[0.1, 16]]
  assert v["hybrids"]["sdsd"]["outcome"] == "not confirmed" and v["outcome"] == "not confirmed"
  # Dense at 99% nowhere: nothing to compare against.
  flat = [_ret("dense", 0, [[0.5, 0.5], [0.5, 0.5]]), _ret("sssd", 0, good)]
  assert sc.retrieval_verdict(flat)["outcome"] == "inconclusive"
  # A seed whose hybrid is missing is not a pass.
  assert sc.retrieval_verdict(runs[:2] + [_ret("dense", 1, dense)])["outcome"] == "inconclusive"


def _qual(variant, seed, loss):
  return {"variant": variant, "seed": seed, "val": {">=0": loss, ">=512": loss + 0.1}}


def test_quality_verdict_gap_and_seed_spread():
  near = [_qual("dense", 0, 3.0), _qual("dense", 1, 3.02), _qual("sdsd", 0, 3.05),
          _qual("sdsd", 1, 3.06)]
  v = sc.quality_verdict(near)["hybrids"]["sdsd"]
  assert v["outcome"] == "confirmed" and v["seeds"] == 2
  assert v["buckets"][">=0"]["gap"] == pytest.approx(3.055 / 3.01 - 1)
  # 10% worse with a 0.3% seed spread fails; the same gap with a 6% spread passes.
  far = [_qual("dense", 0, 3.0), _qual("dense", 1, 3.01), _qual("sssd", 0, 3.3),
         _qual("sssd", 1, 3.31)]
  assert sc.quality_verdict(far)["outcome"] == "not confirmed"
  noisy = far[:1] + [_qual("dense", 1, 3.18)] + far[2:]
  assert sc.quality_verdict(noisy)["hybrids"]["sssd"]["buckets"][">=0"]["passes"]
  assert sc.quality_verdict(far[2:])["outcome"] == "inconclusive"


def test_retrieval_end_to_end_append_and_jobs(tmp_path):
  out = tmp_path / "results"
  common = ["retrieval", "--quick", "--seeds", "0", "--max-steps", "2", "--eval-every", "1",
            "--samples", "2", "--out", str(out), "--set", "seq_len=128", "model.max_seq_len=128"]
  res = sc.main([*common, "--variants", "sssd"])
  (run,) = res["runs"]
  assert run["variant"] == "sssd" and run["steps"] == 2 and len(run["evals"]) == 2
  assert np.asarray(run["final"]["accuracy"]).shape == (5, 4)
  assert res["lengths"] == [16, 32, 64, 128] and res["train_lengths"] == [32, 64, 128]
  # Two processes, one variant each, merged with the earlier file's run.
  res = sc.main([*common, "--variants", "dense,ssss", "--append", "--jobs", "2"])
  assert [r["variant"] for r in res["runs"]] == ["dense", "sssd", "ssss"] and res["jobs"] == 2
  assert not list(out.glob(".*_jobs"))
  assert res["verdict"]["hybrids"]["sssd"]["outcome"] in ("inconclusive", "not confirmed",
                                                          "confirmed")
  saved = json.loads((out / "s2_retrieval_cpu.json").read_text())
  assert len(saved["runs"]) == 3 and saved["environment"]["backend"] == "cpu"
  assert all((out / p).exists() for p in saved["plots"])


def test_needle_retrieval_end_to_end(tmp_path):
  """--task needle: text prompts under the corpus' BPE, the target's weights, its own file."""
  out = tmp_path / "results"
  res = sc.main(["retrieval", "--quick", "--task", "needle", "--seeds", "0", "--variants", "sssd",
                 "--max-steps", "2", "--eval-every", "1", "--samples", "2", "--out", str(out),
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "data.max_bytes=1000000"])
  (run,) = res["runs"]
  assert res["task"] == "needle" and run["task"] == "needle" and res["lengths"] == [256, 512]
  assert np.asarray(run["final"]["accuracy"]).shape == (5, 2) and len(run["evals"]) == 2
  assert run["fresh_rows"] + run["reused_rows"] >= 2 and 0 < run["fresh_share"] <= 1
  assert (out / "s2_retrieval_needle_cpu.json").exists()
  assert all((out / p).exists() for p in res["plots"])


def test_needle_grid_batches_weigh_the_target(tmp_path):
  from experiments.longctx_train import TARGET_TOKENS
  from experiments.train import Trainer, prepare_data
  seed = 3
  print(f"seed={seed}")
  cfg = sc.run_config("dense", seed, [*sc.RETRIEVAL_QUICK, *sc.NEEDLE_QUICK,
                                      f"data.cache_dir={tmp_path / 'cache'}",
                                      "data.max_bytes=1000000"], True)
  data = prepare_data(cfg, progress=False)
  task = sc.NeedleGrid(cfg, Trainer(cfg).codec, lengths=[256], depths=[0.5], samples=2,
                       train_lengths=[256], depth_range=(0.02, 0.98), workers=1, data=data)
  try:
    tt, w = task.batch(np.random.default_rng(seed), 3, 256)
    assert tt.shape == (3, 257) and w.shape == (3, 256)
    eot = tt[0, 1:][w[0] > 0][-1]
    for row, wr in zip(tt, w):
      on = np.nonzero(wr)[0]
      assert 2 <= len(on) <= TARGET_TOKENS and np.all(np.diff(on) == 1)  # one run of targets
      assert row[1:][on[-1]] == eot  # the last target is end of text
      text = data.tokenizer.decode(row[1:][on[:-1]].tolist())
      assert text.strip().rstrip(".").isdigit() and len(text.strip().rstrip(".")) == 7
    prompt, _ = task.cells[0][0][0]  # the grid cell (depth 0.5, length 256)
    assert len(prompt) <= 256 - TARGET_TOKENS and len(task.cells[0][0]) == 2
  finally:
    task.close()
  with pytest.raises(ValueError, match="prompts under 64"):
    sc.NeedleGrid(cfg, None, lengths=[100], depths=[0.5], samples=1, train_lengths=[256],
                  depth_range=(0, 1), data=data)


def test_quality_end_to_end(tmp_path, corpus):
  out = tmp_path / "results"
  res = sc.main(["quality", "--quick", "--seeds", "0", "--variants", "dense,sdsd",
                 "--max-steps", "2", "--eval-every", "1", "--out", str(out), "--set",
                 f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                 "model.vocab_size=320", "seq_len=64", "model.max_seq_len=64", "eval_batches=1"])
  assert [r["variant"] for r in res["runs"]] == ["dense", "sdsd"]
  assert all(list(r["val"]) == [">=0", ">=8", ">=32"] and r["steps"] == 2 for r in res["runs"])
  assert res["corpus"]["source"] == str(corpus)
  assert set(res["verdict"]["hybrids"]) == {"sdsd"}
  assert (out / "s2_quality_cpu.png").exists()


def test_bad_arguments_exit():
  for argv in (["retrieval", "--variants", "dense,xyz"], ["quality", "--max-steps", "0"],
               ["retrieval", "--patience", "0"], ["quality", "--jobs", "0"]):
    with pytest.raises(SystemExit):
      sc.main(argv)


def test_s2_layer_specs_load_in_a_fresh_process():
  """A config naming 's2:' layers loads without the caller importing s2attn first."""
  import subprocess
  import sys
  code = ("from experiments.s2_claims import run_config, RETRIEVAL_GPU;"
          "print(run_config('sdsd', 0, RETRIEVAL_GPU, False).model_config().layer_attn[0])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip().startswith("s2:block_size=64")
