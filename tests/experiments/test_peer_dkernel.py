"""The DKernel peer's plumbing (experiments/peer_dkernel.py and bench attention --peer): where
its source is looked for, its version lookup answered, its JSON rows read back and compared
with ours. DKernel itself runs on a GPU only; here fake processes and packages stand in."""

import importlib.metadata
import stat
import sys

import pytest

from experiments import bench_attention, peer_dkernel
from experiments.targets import render_targets

ROW = ('{"impl": "dkernel_s2_vs8", "T": 8192, "fwd_ms": 1.5, "bwd_ms": 3.0, "fb_ms": 4.5, '
       '"peer": {"torch": "2.11", "triton": "3.6", "device": "H200"}}')


def _fake_python(tmp_path, body: str):
  exe = tmp_path / "fake-python"
  exe.write_text(f"#!/bin/sh\n{body}\n")
  exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
  return str(exe)


def test_dkernel_path_names_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.delenv("EFFLLM_DKERNEL", raising=False)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="needs DKernel's source.*--peer-path"):
    bench_attention.dkernel_path(str(tmp_path / "nowhere"))
  (tmp_path / "dk" / "dkernel").mkdir(parents=True)
  (tmp_path / "dk" / "dkernel" / "__init__.py").write_text("")
  monkeypatch.setenv("EFFLLM_DKERNEL", str(tmp_path / "dk"))
  assert bench_attention.dkernel_path() == tmp_path / "dk"


def test_peer_rows_are_read_back_with_their_source(tmp_path):
  rows = bench_attention.peer_rows(tmp_path, [8192], [8], 4, 16,
                                   python=_fake_python(tmp_path, f"echo 'log line'\necho '{ROW}'"))
  assert rows == [{"impl": "dkernel_s2_vs8", "T": 8192, "fwd_ms": 1.5, "bwd_ms": 3.0,
                   "fb_ms": 4.5, "source": "DKernel, torch 2.11, triton 3.6, same run"}]
  with pytest.raises(RuntimeError, match="exit 3.*no torch"):
    bench_attention.peer_rows(tmp_path, [8192], [8], 4, 16,
                              python=_fake_python(tmp_path, "echo 'no torch' >&2; exit 3"))


def test_dkernel_is_imported_from_its_folder_without_an_installed_version(tmp_path):
  pkg = tmp_path / "repo" / "dkernel"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("import importlib.metadata\n"
                                   "__version__ = importlib.metadata.version(__name__)\n")
  real = importlib.metadata.version
  try:
    mod = peer_dkernel._import_dkernel(str(tmp_path / "repo"))
    assert mod.__version__ == "source"
    assert importlib.metadata.version is real  # the patch does not outlive the import
  finally:
    sys.modules.pop("dkernel", None)
    sys.path.remove(str((tmp_path / "repo").resolve()))
  with pytest.raises(FileNotFoundError, match="no dkernel package"):
    peer_dkernel._import_dkernel(str(tmp_path))


def test_summary_and_targets_compare_dkernel_in_the_same_run():
  rows = [{"impl": "cudnn_dense", "T": 8192, "fwd_gflop": 100.0, "fwd_ms": 4.0, "bwd_ms": 8.0,
           "fwd_tflops": 1.0, "bwd_tflops": 1.0},
          {"impl": "ours_s2_vs8", "T": 8192, "fwd_gflop": 20.0, "fwd_ms": 1.0, "bwd_ms": 2.0,
           "fwd_tflops": 1.0, "bwd_tflops": 1.0},
          {"impl": "dkernel_s2_vs8", "T": 8192, "fwd_ms": 0.8, "bwd_ms": 3.0}]
  payload = {"rows": rows}
  bench_attention._summarise(payload)
  s = payload["summary"][0]
  assert (s["fwd_vs_dkernel"], s["bwd_vs_dkernel"]) == pytest.approx((0.8, 1.5))
  table = render_targets({"attention_gpu": {"environment": {}, **payload}})  # as written
  line = next(ln for ln in table.splitlines() if "faster than DKernel" in ln)
  assert "vs8 8K: 0.80x / 1.50x" in line and "| no |" in line
