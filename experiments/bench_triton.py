"""Block-sparse attention forward: the Pallas kernel against the hand-written jax-triton kernel.

    python -m experiments bench triton                       # GPU: T = 8192, 32768
    python -m experiments bench triton --seq 8192 --out /tmp/res
    python -m experiments bench triton --seq 256 --check-seq 256 --batch 1 --heads 2 \
        --kv-heads 2 --repeats 1
                                                             # CPU smoke (Pallas interpret only)

bf16, head_dim 128, batch 4, 16 heads (K/V heads --kv-heads), block 64, causal. Layouts: dense
causal (`causal_layout`, one layout head) and S2 (`s2_layout(heads, n, local_blocks=8,
vert_stride=16)`). Both implementations return o and the log-sum-exp. First a correctness check
at --check-seq (1024) against the dense float32 reference (max abs error of o, and max rel =
max abs / max |reference|; LSE max abs error), then forward times: median of --repeats
host-timed calls after 2 warm-ups (jax.block_until_ready). TFLOP/s counts the computed blocks
only, 4 * B * block^2 * E per block, the diagonal blocks counted whole (not halved).
Each item is measured in its own try/except: a failure prints its traceback and the rest runs.
Results: results/triton_attention_<backend>.json ({"rows": [...], "checks": [...]}).
"""

from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_attention import computed_blocks, time_ms
from experiments.results import write_results
from pallas_kernels import (
  block_sparse_attention,
  block_sparse_attention_reference,
  causal_layout,
  s2_layout,
)
from pallas_kernels.triton_block_sparse import block_sparse_attention_triton


def _layouts(H: int, n: int) -> dict[str, np.ndarray]:
  return {"dense": causal_layout(n),
          "s2": s2_layout(H, n, local_blocks=8, vert_stride=16)}


def _impls(layout, block_size: int, with_triton: bool) -> dict:
  """name -> jitted (q, k, v) -> (o, lse)."""
  out = {"pallas": jax.jit(lambda q, k, v: block_sparse_attention(
      q, k, v, layout, block_size=block_size, causal=True, return_lse=True))}
  if with_triton:
    out["triton"] = jax.jit(lambda q, k, v: block_sparse_attention_triton(
        q, k, v, layout, block_size=block_size, causal=True, return_lse=True))
  return out


def _inputs(key, B, T, H, K, E, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (B, T, H, E), jnp.float32).astype(dtype),
          jax.random.normal(kk, (B, T, K, E), jnp.float32).astype(dtype),
          jax.random.normal(kv, (B, T, K, E), jnp.float32).astype(dtype))


def check(args, dtype, with_triton: bool) -> list[dict]:
  """Errors of each implementation against the float32 reference at --check-seq."""
  T, B, H, K, E, bs = args.check_seq, args.batch, args.heads, args.kv_heads, 128, args.block
  q, k, v = _inputs(jax.random.PRNGKey(0), B, T, H, K, E, dtype)
  out = []
  for lname, layout in _layouts(H, T // bs).items():
    ro, rlse = block_sparse_attention_reference(q, k, v, layout, block_size=bs, causal=True,
                                                return_lse=True)
    ro, rlse = np.asarray(ro), np.asarray(rlse)
    for impl, fn in _impls(layout, bs, with_triton).items():
      row = {"impl": impl, "layout": lname, "T": T}
      try:
        o, lse = fn(q, k, v)
        err = np.abs(np.asarray(o, np.float32) - ro)
        row["max_abs_err"] = float(err.max())
        row["max_rel_err"] = float(err.max() / max(np.abs(ro).max(), 1e-30))
        lse = np.asarray(lse)
        finite = np.isfinite(rlse)
        row["lse_max_abs_err"] = float(np.abs(lse[finite] - rlse[finite]).max())
        row["lse_inf_match"] = bool((np.isfinite(lse) == finite).all())
      except Exception as e:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
      print(f"check {impl:<7} {lname:<6} T={T}: " + ", ".join(
          f"{k_}={v_:.3e}" if isinstance(v_, float) else f"{k_}={v_}"
          for k_, v_ in row.items() if k_ not in ("impl", "layout", "T")), flush=True)
      out.append(row)
  return out


def bench(args, dtype, with_triton: bool) -> list[dict]:
  """Forward times and TFLOP/s of each implementation, layout and sequence length."""
  B, H, K, E, bs = args.batch, args.heads, args.kv_heads, 128, args.block
  rows = []  # the correctness checks (at --check-seq) stay in their own section, with their T
  for T in [int(s) for s in args.seq.split(",")]:
    q, k, v = _inputs(jax.random.PRNGKey(T), B, T, H, K, E, dtype)
    for lname, layout in _layouts(H, T // bs).items():
      flops = 4.0 * B * bs * bs * E * computed_blocks(layout, H)
      for impl, fn in _impls(layout, bs, with_triton).items():
        row = {"impl": impl, "layout": lname, "T": T, "fwd_gflop": flops / 1e9}
        try:
          row["fwd_ms"] = time_ms(fn, (q, k, v), args.repeats)
          row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
          print(f"{impl:<7} {lname:<6} T={T:>6}: {row['fwd_ms']:.3f} ms, "
                f"{row['fwd_tflops']:.1f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
          traceback.print_exc()
          row["error"] = f"{type(e).__name__}: {e}"[:2000]
          print(f"{impl:<7} {lname:<6} T={T:>6}: FAILED ({row['error'][:200]})", flush=True)
        rows.append(row)
    del q, k, v
  return rows


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog="python -m experiments bench triton", description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seq", default="8192,32768", help="comma-separated sequence lengths")
  p.add_argument("--check-seq", type=int, default=1024, help="sequence length of the check")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--block", type=int, default=64)
  p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
  p.add_argument("--out", default=None, help="results folder (default results/)")
  args = p.parse_args(argv)
  dtype = jnp.bfloat16

  triton_error = None
  try:
    import jax_triton  # noqa: F401
  except Exception as e:  # noqa: BLE001 - ImportError, or jax_triton's own check of the jax build
    traceback.print_exc()
    triton_error = f"{type(e).__name__}: {e}"
    print(f"\n*** jax_triton unavailable ({triton_error}); timing the Pallas kernel only ***\n",
          flush=True)
  with_triton = triton_error is None
  print(f"backend {jax.default_backend()}, device {jax.devices()[0]}", flush=True)

  checks = check(args, dtype, with_triton)
  rows = bench(args, dtype, with_triton)
  payload = {
      "config": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                 "head_dim": 128, "block": args.block, "dtype": "bfloat16", "causal": True,
                 "s2": {"local_blocks": 8, "vert_stride": 16}, "repeats": args.repeats,
                 "warmup": 2, "flops": "4*B*block^2*E per computed block, diagonal whole"},
      "triton_error": triton_error,
      "checks": checks,
      "rows": rows,
  }
  try:
    path = write_results("triton_attention", payload, args.out)
    print(f"wrote {path}")
  except Exception:  # noqa: BLE001 - still print the table
    traceback.print_exc()

  print(f"\n{'impl':<8}{'layout':<8}{'T':>7}{'fwd ms':>10}{'TFLOP/s':>10}")
  for r in rows:
    ms = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "FAILED"
    tf = f"{r['fwd_tflops']:.1f}" if "fwd_tflops" in r else "-"
    print(f"{r['impl']:<8}{r['layout']:<8}{r['T']:>7}{ms:>10}{tf:>10}")
  for c in checks:
    err = f"{c['max_rel_err']:.1e}" if c.get("max_rel_err") is not None else c.get("error", "-")
    print(f"check {c['impl']:<8}{c['layout']:<8}T={c['T']}: max rel err {err}")
  return payload


if __name__ == "__main__":
  main()
