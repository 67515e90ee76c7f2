"""Block-sparse attention speed: dense causal and S2 layouts against cuDNN and JAX's Pallas mha.

    python -m experiments bench attention                          # GPU: 4K..128K, all configs
    python -m experiments.bench_attention --quick --out /tmp/res   # GPU: 4K and 8K
    python -m experiments.bench_attention --seq 256 --batch 1 --heads 2 --repeats 2   # CPU smoke

bf16, head_dim 128, batch x heads fixed. For each sequence length: (a) the dense causal layout
through the block-sparse kernel, (b) the S2 layout (block 64, local window 512 tokens, vertical
stride 8 and 16, a different offset per head), and the baselines cuDNN
(jax.nn.dot_product_attention(implementation="cudnn"), causal) and JAX's Pallas Triton flash
attention (ops/gpu/attention.mha, causal). Forward and forward+backward times are the median of
--repeats host-timed calls after warm-up; TFLOP/s counts only the blocks computed (dense causal:
the lower triangle). Backward = (forward+backward) - forward, at 2.5x the forward FLOPs.
Correctness of the compiled kernels against the float32 reference runs first (--check).
With --peer dkernel, DKernel (the S2 paper's Triton kernels, from its source folder: never part
of the project) is timed at the same lengths and strides in the same run, in a PyTorch process
of its own (experiments/peer_dkernel.py), and its rows join the results file.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.results import write_results
from pallas_kernels import (
  BlockSparseTiles,
  block_sparse_attention,
  block_sparse_attention_reference,
  cache_decode_attention,
  cache_decode_attention_reference,
  causal_layout,
  s2_layout,
)

# Where `--peer dkernel` looks for DKernel's source when --peer-path is not given: $EFFLLM_DKERNEL,
# then an ignored folder of the checkout (what the GPU machine is sent), then the shared copy.
DKERNEL_PATHS = (".peers/dkernel", "../shared/peers/dkernel")
PEER_SCRIPT = Path(__file__).with_name("peer_dkernel.py")


def dkernel_path(path: str | None = None) -> Path:
  """DKernel's repository folder: `path`, $EFFLLM_DKERNEL or the first of DKERNEL_PATHS that
  holds the package; FileNotFoundError naming where it looked."""
  tried = [path] if path else [p for p in (os.environ.get("EFFLLM_DKERNEL"),) if p] + list(
      DKERNEL_PATHS)
  for t in tried:
    if (Path(t).expanduser() / "dkernel" / "__init__.py").is_file():
      return Path(t).expanduser()
  raise FileNotFoundError(f"--peer dkernel needs DKernel's source (its repository folder, "
                          f"holding dkernel/__init__.py); looked in {tried}: pass --peer-path")


def peer_rows(path: Path, seqs: list[int], strides: list[int], batch: int, heads: int,
              python: str = sys.executable) -> list[dict]:
  """DKernel's rows (experiments/peer_dkernel.py in a PyTorch process of its own), one per
  (length, stride); a failed size comes back as a row with an error."""
  cmd = [python, str(PEER_SCRIPT), "--path", str(path), "--seq", ",".join(map(str, seqs)),
         "--strides", ",".join(map(str, strides)), "--batch", str(batch), "--heads", str(heads)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not rows:
    raise RuntimeError(f"the DKernel process failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-2000:]}")
  for r in rows:
    peer = r.pop("peer", None)
    if peer:
      r["source"] = f"DKernel, torch {peer['torch']}, triton {peer['triton']}, same run"
  return rows


def time_ms(fn, args, repeats: int, warmup: int = 2, inner: int = 1) -> float:
  """Median wall-clock milliseconds of fn(*args) (synchronised), after warm-up calls. With
  inner > 1, each sample is `inner` calls dispatched back to back and synchronised once, divided
  by inner: the device time of a kernel in a stream of them (as inside a decode loop), without
  one host round trip per call."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(inner)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / inner)
  return 1e3 * float(np.median(times))


def _fwd_and_fb(attn):
  """(forward, forward+backward) jitted from attn(q, k, v) -> o."""
  fwd = jax.jit(attn)

  def fb(q, k, v, do):
    o, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)
  return fwd, jax.jit(fb)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_kernels(interpret: bool) -> dict:
  """Compiled kernels vs the float32 reference on fresh random inputs: relative errors."""
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  out = {"seed": seed}
  small = interpret
  for name, dtype, T, lay in (("bf16_s2_gqa", jnp.bfloat16, 256 if small else 2048, "s2"),
                              ("bf16_random_shared", jnp.bfloat16, 256 if small else 1024, "rnd"),
                              ("f32_random_perhead", jnp.float32, 128 if small else 512, "rnd")):
    B, H, K, E = 2, 4, 2, 128
    bs = 64 if not small else 32
    n = -(-T // bs)
    if lay == "s2":
      layout = s2_layout(H, n, local_blocks=2, vert_stride=4)
    else:
      layout = rng.random((1 if "shared" in name else H, n, n)) < 0.4
      layout[0, rng.integers(n)] = False  # an empty query block
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
                   for s in ((B, T, H, E), (B, T, K, E), (B, T, K, E), (B, T, H, E)))
    kern = lambda q, k, v, layout=layout, bs=bs: block_sparse_attention(
        q, k, v, layout, block_size=bs, interpret=interpret)
    ref = lambda q, k, v, layout=layout, bs=bs: block_sparse_attention_reference(
        q, k, v, layout, block_size=bs)
    try:
      both = lambda q, k, v, do, f: (f(q, k, v), *jax.vjp(f, q, k, v)[1](do))
      got = jax.jit(functools.partial(both, f=kern))(q, k, v, do)
      f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
      want = jax.jit(functools.partial(both, f=ref))(*f32)
      errs = {n_: _rel(g, w) for n_, g, w in zip(("o", "dq", "dk", "dv"), got, want)}
      errs["nan"] = bool(any(np.isnan(np.asarray(g, np.float32)).any() for g in got))
      tol = 1e-4 if dtype == jnp.float32 else 2e-2
      errs["ok"] = bool(not errs["nan"] and max(errs[x] for x in ("o", "dq", "dk", "dv")) < tol)
    except Exception as e:  # noqa: BLE001 - a failing lowering is a result too
      traceback.print_exc()
      errs = {"error": f"{type(e).__name__}: {e}"[:2000], "ok": False}
    out[name] = errs
  # Decode kernel: a [B, K, S, E] cache filled up to each sequence's length (pos = slot index,
  # -1 past it), G = 4 query heads per KV head, a random per-head token mask.
  try:
    B, S, K, G, E = 4, 4096 if not small else 256, 2, 4, 128
    q = jnp.asarray(rng.standard_normal((B, K, G, E)), jnp.bfloat16)
    kc = jnp.asarray(rng.standard_normal((B, K, S, E)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((B, K, S, E)), jnp.bfloat16)
    lengths = rng.integers(1, S + 1, B)
    pos, q_pos = _filled_positions(lengths, K, S)
    mask = jnp.asarray(rng.random((B, K, G, S)) < 0.3)
    o, lse = cache_decode_attention(q, kc, vc, pos, q_pos, mask, interpret=interpret)
    ro, rlse = cache_decode_attention_reference(q.astype(jnp.float32), kc, vc, pos, q_pos, mask)
    fin = np.isfinite(np.asarray(rlse))
    lse_err = float(np.max(np.abs(np.asarray(lse)[fin] - np.asarray(rlse)[fin]), initial=0.0))
    out["decode_bf16"] = {"o": _rel(o, ro), "lse": lse_err,
                          "ok": _rel(o, ro) < 2e-2 and lse_err < 1e-2}
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    out["decode_bf16"] = {"error": f"{type(e).__name__}: {e}"[:2000], "ok": False}
  return out


def _filled_positions(lengths, K: int, N: int):
  """(pos int32 [B, K, N], q_pos int32 [B]) of caches filled in order: slot n holds position n
  for n < length, empty (-1) past it; the query sits at length - 1."""
  lengths = jnp.asarray(lengths, jnp.int32)
  slots = jnp.arange(N, dtype=jnp.int32)
  pos = jnp.where(slots[None, :] < lengths[:, None], slots[None, :], -1)
  return jnp.broadcast_to(pos[:, None, :], (lengths.shape[0], K, N)), lengths - 1


def time_cache_decode(B: int, K: int, G: int, N: int, E: int, dtype=jnp.bfloat16,
                      repeats: int = 20, **kernel_kwargs) -> dict:
  """Decode attention over a full [B, K, N, E] cache: the Pallas kernel and the jnp reference.

  Returns {"bytes": K + V + pos bytes read, "kernel_ms", "kernel_gbps", "reference_ms",
  "reference_gbps"} (median of `repeats` host-timed calls; GB/s = bytes / time). kernel_kwargs
  (block_size, num_splits, num_warps, num_stages, interpret) go to cache_decode_attention.
  """
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(dtype)
  q = jnp.asarray(rng.standard_normal((B, K, G, E)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, K, N, E)), dtype) for _ in range(2))
  pos, q_pos = _filled_positions(np.full(B, N), K, N)
  pos = jnp.array(pos)  # materialised: the kernel reads it like a real cache's
  nbytes = 2 * B * K * N * E * dtype.itemsize + B * K * N * 4
  kern = jax.jit(functools.partial(cache_decode_attention, **kernel_kwargs))
  ref = jax.jit(cache_decode_attention_reference)
  row = {"B": B, "K": K, "G": G, "N": N, "E": E, "dtype": dtype.name, "bytes": nbytes}
  for name, fn in (("kernel", kern), ("reference", ref)):
    ms = time_ms(fn, (q, k, v, pos, q_pos), repeats)
    row[f"{name}_ms"] = ms
    row[f"{name}_gbps"] = nbytes / ms / 1e6
  return row


def computed_blocks(layout: np.ndarray, num_heads: int) -> int:
  """Blocks computed per batch element: causal part of the layout summed over all heads."""
  eff = layout & np.tril(np.ones(layout.shape[1:], bool))[None]
  per_head = eff.sum(axis=(1, 2))
  return int(per_head.sum() * (num_heads // layout.shape[0]))


def _cases(T: int, H: int, dense_block: int, strides: list[int], local: int, tiles):
  """(name, attention fn, forward FLOPs per batch element) of every implementation at T."""
  E = 128
  cases = []
  dense_flops = 4.0 * H * E * T * (T + 1) / 2  # causal: the lower triangle
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
  cases.append(("cudnn_dense", cudnn, dense_flops, None))
  try:
    from jax.experimental.pallas.ops.gpu import attention as jax_attention
    mha = lambda q, k, v: jax_attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(E), causal=True)
    cases.append(("jax_pallas_mha", mha, dense_flops, None))
  except Exception as e:  # noqa: BLE001
    print(f"JAX Pallas mha unavailable: {e}")
  n = T // dense_block
  dense = causal_layout(n)
  blocks = computed_blocks(dense, H)
  ours = lambda q, k, v, lay=dense, t=tiles: block_sparse_attention(
      q, k, v, lay, block_size=dense_block, tiles=t)
  cases.append((f"ours_dense_b{dense_block}", ours, 4.0 * E * blocks * dense_block**2, dense))
  for stride in strides:
    n = T // 64
    lay = s2_layout(H, n, local_blocks=local // 64, vert_stride=stride)
    blocks = computed_blocks(lay, H)
    s2 = lambda q, k, v, lay=lay, t=tiles: block_sparse_attention(q, k, v, lay, block_size=64,
                                                                  tiles=t)
    cases.append((f"ours_s2_vs{stride}", s2, 4.0 * E * blocks * 64**2, lay))
  return cases


def _sweep(B: int, H: int, repeats: int, T: int = 8192) -> list[dict]:
  """Forward / backward time of S2 (stride 16) and dense layouts under a few launch settings."""
  rows = []
  E = 128
  rng = np.random.default_rng(0)
  q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, E)), jnp.bfloat16) for _ in range(4))
  for bs, lay in ((64, s2_layout(H, T // 64, local_blocks=8, vert_stride=16)),
                  (64, causal_layout(T // 64)), (128, causal_layout(T // 128))):
    for wf, sf, wb, sb in ((4, 2, 4, 2), (4, 3, 4, 2), (8, 3, 8, 2), (4, 4, 8, 1)):
      t = BlockSparseTiles(num_warps_fwd=wf, num_stages_fwd=sf, num_warps_bwd=wb,
                           num_stages_bwd=sb)
      attn = lambda q, k, v, lay=lay, t=t, bs=bs: block_sparse_attention(q, k, v, lay,
                                                                         block_size=bs, tiles=t)
      fwd, fb = _fwd_and_fb(attn)
      flops = B * 4.0 * E * computed_blocks(lay, H) * bs**2
      try:
        tf = time_ms(fwd, (q, k, v), repeats)
        tfb = time_ms(fb, (q, k, v, do), repeats)
        row = dict(T=T, block=bs, layout="s2" if lay.shape[0] > 1 else "dense", warps_fwd=wf,
                   stages_fwd=sf, warps_bwd=wb, stages_bwd=sb, fwd_ms=tf, fb_ms=tfb,
                   fwd_tflops=flops / tf / 1e9, bwd_tflops=2.5 * flops / max(tfb - tf, 1e-9) / 1e9)
      except Exception as e:  # noqa: BLE001
        row = dict(T=T, block=bs, warps_fwd=wf, stages_fwd=sf, error=f"{type(e).__name__}: {e}"[
            :500])
      print("sweep", row, flush=True)
      rows.append(row)
  return rows


def _plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, key, title in ((axes[0], "fwd_tflops", "forward"), (axes[1], "bwd_tflops", "backward")):
    for impl in sorted({r["impl"] for r in rows}):
      pts = sorted((r["T"], r[key]) for r in rows if r["impl"] == impl and r.get(key))
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s on computed blocks")
    ax.set_title(f"{title}, bf16, head_dim 128")
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seq", default="4096,8192,16384,32768,65536,131072",
                 help="comma-separated sequence lengths")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
  p.add_argument("--strides", default="8,16", help="S2 vertical strides")
  p.add_argument("--local", type=int, default=512, help="S2 local window in tokens")
  p.add_argument("--dense-block", type=int, default=64, help="block of the dense causal layout "
                 "(64 beat 128 on an H200: 128-row tiles made the backward 2x slower)")
  p.add_argument("--dense-max", type=int, default=65536,
                 help="longest sequence for our dense layout (time grows as T^2)")
  p.add_argument("--cudnn-max", type=int, default=131072, help="longest sequence for cuDNN")
  p.add_argument("--mha-max", type=int, default=32768,
                 help="longest sequence for JAX's Pallas mha (its backward is slow)")
  p.add_argument("--quick", action="store_true", help="4K and 8K only")
  p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
  p.add_argument("--sweep", action="store_true", help="also sweep launch settings at 8K")
  p.add_argument("--budget", type=float, default=1e9, help="stop starting new sizes after this "
                 "many seconds of our kernels' timing (the peer's run not counted)")
  p.add_argument("--warps-fwd", type=int, default=None)
  p.add_argument("--stages-fwd", type=int, default=3)
  p.add_argument("--warps-bwd", type=int, default=None)
  p.add_argument("--stages-bwd", type=int, default=2)
  p.add_argument("--peer", choices=("dkernel",), default=None,
                 help="also time DKernel (the S2 paper's kernels) on this GPU in this run, in a "
                      "PyTorch process of its own, at the same lengths and strides")
  p.add_argument("--peer-path", default=None,
                 help=f"DKernel's repository folder (default $EFFLLM_DKERNEL, then "
                      f"{', '.join(DKERNEL_PATHS)})")
  p.add_argument("--peer-python", default=sys.executable, help="the Python that has PyTorch")
  p.add_argument("--out", default=None, help="results folder (default results/)")
  args = p.parse_args(argv)
  seqs = [4096, 8192] if args.quick else [int(s) for s in args.seq.split(",")]
  strides = [int(s) for s in args.strides.split(",")]
  peer: dict[int, list[dict]] = {}
  if args.peer:  # first, before anything starts JAX's backend and it takes the GPU's memory
    for r in peer_rows(dkernel_path(args.peer_path), seqs, strides, args.batch, args.heads,
                       args.peer_python):
      print(r, flush=True)
      peer.setdefault(r["T"], []).append(r)
  t_start = time.perf_counter()
  gpu = jax.default_backend() == "gpu"
  tiles = BlockSparseTiles(num_warps_fwd=args.warps_fwd, num_stages_fwd=args.stages_fwd,
                           num_warps_bwd=args.warps_bwd, num_stages_bwd=args.stages_bwd)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  payload: dict = {"config": vars(args), "rows": []}
  if not args.no_check:
    payload["check"] = check_kernels(interpret=not gpu)
    print("check", payload["check"], flush=True)
  if args.sweep and gpu:
    payload["sweep"] = _sweep(args.batch, args.heads, args.repeats)
  out_dir = Path(args.out) if args.out else None
  B, H, E = args.batch, args.heads, 128
  rng = np.random.default_rng()
  for T in seqs:
    if time.perf_counter() - t_start > args.budget:
      print(f"budget reached: skipping T={T} and longer", flush=True)
      break
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, E)), jnp.bfloat16)
                   for _ in range(4))
    for impl, attn, flops, _ in _cases(T, H, args.dense_block, strides, args.local, tiles):
      limit = {"cudnn_dense": args.cudnn_max, "jax_pallas_mha": args.mha_max}.get(
          impl, args.dense_max if "dense" in impl else T)
      if (not gpu and impl in ("cudnn_dense", "jax_pallas_mha")) or T > limit:
        continue
      flops = B * flops
      row = {"impl": impl, "T": T, "fwd_gflop": flops / 1e9}
      try:
        fwd, fb = _fwd_and_fb(attn)
        row["fwd_ms"] = time_ms(fwd, (q, k, v), args.repeats)
        row["fb_ms"] = time_ms(fb, (q, k, v, do), args.repeats)
        row["bwd_ms"] = row["fb_ms"] - row["fwd_ms"]
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        row["bwd_tflops"] = 2.5 * flops / max(row["bwd_ms"], 1e-9) / 1e9
        row["fb_tflops"] = 3.5 * flops / row["fb_ms"] / 1e9
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:1000]
      print(row, flush=True)
      payload["rows"].append(row)
    del q, k, v, do
    payload["rows"] += peer.pop(T, [])
    _summarise(payload)
    path = write_results("attention", payload, out_dir)  # after every size: partial results
  path = write_results("attention", payload, out_dir)
  _plot(payload["rows"], path.with_suffix(".png"))
  _print_table(payload)
  return payload


def _summarise(payload: dict) -> None:
  """Speed-ups over cuDNN dense against the ideal (dense blocks / computed blocks)."""
  by = {(r["impl"], r["T"]): r for r in payload["rows"] if "fwd_ms" in r}
  summary = []
  for (impl, T), r in sorted(by.items()):
    dense = by.get(("cudnn_dense", T))
    if not impl.startswith("ours_s2") or dense is None:
      continue
    ideal = dense["fwd_gflop"] / r["fwd_gflop"]
    s = {"impl": impl, "T": T, "ideal": ideal,
         "fwd_speedup": dense["fwd_ms"] / r["fwd_ms"], "bwd_speedup": dense["bwd_ms"] / r["bwd_ms"]}
    s["fwd_of_ideal"] = s["fwd_speedup"] / ideal
    s["bwd_of_ideal"] = s["bwd_speedup"] / ideal
    s["fwd_vs_cudnn_tflops"] = r["fwd_tflops"] / dense["fwd_tflops"]
    s["bwd_vs_cudnn_tflops"] = r["bwd_tflops"] / dense["bwd_tflops"]
    dk = by.get(("dkernel" + impl[len("ours"):], T))  # the same stride, timed in this run
    if dk:
      s["dkernel_fwd_ms"], s["dkernel_bwd_ms"] = dk["fwd_ms"], dk["bwd_ms"]
      s["fwd_vs_dkernel"] = dk["fwd_ms"] / r["fwd_ms"]
      s["bwd_vs_dkernel"] = dk["bwd_ms"] / r["bwd_ms"]
    summary.append(s)
  payload["summary"] = summary


def _print_table(payload: dict) -> None:
  print(f"\n{'impl':<20}{'T':>8}{'fwd ms':>10}{'fwd TF/s':>10}{'bwd ms':>10}{'bwd TF/s':>10}")
  for r in payload["rows"]:
    if "fwd_ms" in r:
      tf = {k: f"{r[k]:>10.1f}" if k in r else f"{'-':>10}" for k in ("fwd_tflops", "bwd_tflops")}
      print(f"{r['impl']:<20}{r['T']:>8}{r['fwd_ms']:>10.3f}{tf['fwd_tflops']}"
            f"{r['bwd_ms']:>10.3f}{tf['bwd_tflops']}")
    else:
      print(f"{r['impl']:<20}{r['T']:>8}  error: {r.get('error', '')[:60]}")
  for s in payload.get("summary", []):
    extra = (f"  vs DKernel: fwd {s['fwd_vs_dkernel']:.2f}x bwd {s['bwd_vs_dkernel']:.2f}x"
             if "fwd_vs_dkernel" in s else "")
    print(f"{s['impl']:<14}{s['T']:>7} ideal {s['ideal']:5.1f}x  fwd {s['fwd_speedup']:5.1f}x "
          f"({s['fwd_of_ideal']:.2f})  bwd {s['bwd_speedup']:5.1f}x ({s['bwd_of_ideal']:.2f})"
          f"{extra}")
  if "check" in payload:
    print("check ok:", {k: v.get("ok") for k, v in payload["check"].items() if isinstance(v, dict)})


if __name__ == "__main__":
  main()
