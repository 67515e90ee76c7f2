"""DKernel (the S2-Attention paper's Triton kernels) timed on this GPU, for `bench attention
--peer dkernel`: a PyTorch process of its own, so that JAX and PyTorch do not share the GPU's
memory pools. The project never imports DKernel; this script runs it from the folder it is given
(MIT licensed, benchmarking only) and prints one JSON line per (length, vertical stride).

    python experiments/peer_dkernel.py --path ../shared/peers/dkernel --seq 8192,32768 \\
        --strides 8,16 --batch 4 --heads 16

Shapes as the project's S2 rows: [B, T, H, E] bf16 (seq_dim=1), block 64, local_blocks 8 (512
tokens), causal, a different offset per head (DKernel's default, not homo_head). Times:
`triton.testing.do_bench` medians of the forward, and of the backward alone
(`o.backward(do, retain_graph=True)` on one forward's graph).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path


def _import_dkernel(path: str):
  """dkernel from `path` (its repository folder: the one holding the `dkernel` package). Its
  __init__ asks importlib.metadata for its installed version, which a folder on sys.path does
  not have: answered with "source" for it alone."""
  root = Path(path).expanduser().resolve()
  if not (root / "dkernel" / "__init__.py").is_file():
    raise FileNotFoundError(f"no dkernel package under {root} (expected {root}/dkernel/)")
  sys.path.insert(0, str(root))
  real = importlib.metadata.version

  def version(name):
    return "source" if name == "dkernel" else real(name)
  importlib.metadata.version = version
  try:
    import dkernel
  finally:
    importlib.metadata.version = real
  return dkernel


def measure(dkernel, T: int, stride: int, batch: int, heads: int, head_dim: int, block: int,
            local_blocks: int, warmup: int = 25, rep: int = 100) -> dict:
  import torch
  import triton
  attn = dkernel.LocalStrideSparseAttention(heads, T, block, local_blocks, stride, seq_dim=1)
  attn = attn.to("cuda").to(torch.bfloat16)
  q, k, v = (torch.randn((batch, T, heads, head_dim), dtype=torch.bfloat16, device="cuda",
                         requires_grad=True) for _ in range(3))
  fwd_ms = triton.testing.do_bench(lambda: attn(q, k, v), warmup=warmup, rep=rep)
  o = attn(q, k, v)
  do = torch.randn_like(o)
  bwd_ms = triton.testing.do_bench(lambda: o.backward(do, retain_graph=True), warmup=warmup,
                                   rep=rep)
  return {"impl": f"dkernel_s2_vs{stride}", "T": T, "fwd_ms": float(fwd_ms),
          "bwd_ms": float(bwd_ms), "fb_ms": float(fwd_ms + bwd_ms),
          "peer": {"torch": torch.__version__, "triton": triton.__version__,
                   "device": torch.cuda.get_device_name()}}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--path", required=True, help="DKernel's repository folder")
  ap.add_argument("--seq", default="8192,32768,65536")
  ap.add_argument("--strides", default="8,16")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--local-blocks", type=int, default=8)
  args = ap.parse_args(argv)
  dkernel = _import_dkernel(args.path)
  for T in (int(s) for s in args.seq.split(",")):
    for stride in (int(s) for s in args.strides.split(",")):
      try:
        row = measure(dkernel, T, stride, args.batch, args.heads, args.head_dim, args.block,
                      args.local_blocks)
      except Exception as e:  # noqa: BLE001 - report the size and go on
        row = {"impl": f"dkernel_s2_vs{stride}", "T": T, "error": f"{type(e).__name__}: {e}"}
      print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
