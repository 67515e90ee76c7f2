"""`bench batch --quick`: every scheduler serves the toy workload with the same tokens, BatchLLM
reaches the tree's prefix saving, and the results file and plot are written."""

import json

from experiments import bench_batch


def test_quick_bench_compares_schedulers(tmp_path):
  out = bench_batch.main(["--quick", "--out", str(tmp_path)])
  data = json.loads(open(out["path"]).read())
  rows = {r["scheduler"]: r for r in data["rows"]}
  assert set(rows) == {"batchllm", "fcfs_lru", "lpm"}
  assert all(r["same_tokens_as_first"] == 1.0 and r["errors"] == 0 for r in rows.values())
  assert rows["batchllm"]["prefix_saving_of_optimum"] > 0.95
  assert rows["batchllm"]["prefill_tokens"] < rows["fcfs_lru"]["prefill_tokens"]
  assert rows["batchllm"]["peak_live_pages"] < rows["fcfs_lru"]["peak_live_pages"]
  assert (tmp_path / (out["path"].rsplit("/", 1)[1].replace(".json", ".png"))).exists()
