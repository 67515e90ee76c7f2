"""`bench paged`: the memory bookkeeping against the tree optimum, and the speed comparison at
toy sizes (the kernels in interpret mode on the CPU), both cross-checked against plain
attention."""

import json

from experiments import bench_paged


def test_memory_rows_hold_the_tree_optimum(tmp_path):
  out = bench_paged.main(["--groups", "3", "--per-group", "4", "--prefix", "40", "--suffix", "9",
                          "--page-sizes", "8,16", "--out", str(tmp_path)])
  for r in out["rows"]:
    assert r["pages_held"] == r["tree_optimum_pages"]
    assert r["saving_vs_unshared"] > 1.5


def test_quick_speed_rows_agree_with_plain_attention(tmp_path):
  out = bench_paged.main(["--speed", "--quick", "--out", str(tmp_path)])
  (r,) = json.loads(open(out["path"]).read())["rows"]
  assert r["paged_max_abs_diff"] < 2e-2 and r["shared_max_abs_diff"] < 2e-2  # bf16 inputs
  assert r["paged_kernel_ms"] > 0 and r["shared_prefix_ms"] > 0
