"""python -m experiments bench mpc: one decode step of attention under SecretFlow SPU, MPCache
against the full-cache baselines, bytes and messages from SPU's link statistics.

Per protocol (3PC ABY3, 2PC Cheetah; SEMI2K with a trusted dealer on request), cache length T
and MPCache setting, one layer's decode-step attention (GPT-2 shapes: 12 heads, head dim 64,
FM64) runs in SPU's simulator on this machine's CPU:

  full_softmax    softmax(q K^T) V, the paper's baseline most likely
  full_deferred   normalised after P.V: the OPTIMISED baseline
  naive_topk      plaintext top-k over token scores ported as is (sort + mask), as many tokens
                  as MPCache attends
  mpcache         static eviction to s * T tokens (the cache the step sees), dynamic selection
                  of `keep` of the 32-token clusters by the linear score, the sink and newest
                  clusters always; cross-layer sharing in groups of `share` layers: one layer
                  selects, the others reuse its selection; plus the incremental bounds update

A step's cost with sharing is (selecting layer + (share - 1) sharing layers) / share + bounds.
Latency is modelled from party 0's counts: messages x RTT + bytes x 8 / bandwidth, LAN (1 ms,
10 Gbit/s) and WAN (40 ms, 400 Mbit/s). The static eviction's kept share comes from --static
(the accuracy run, bench press --methods mpcache..., reports what tau keeps on the suite).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from experiments.results import RESULTS_DIR, write_results

NETWORKS = {"LAN": (1e-3, 10e9), "WAN": (40e-3, 400e6)}  # (RTT seconds, bits per second)
SIZE = 32  # level-1 cluster size (the paper's)


def latency(bytes_sent: float, messages: float, network: str) -> float:
  """Modelled seconds: messages x RTT + bytes x 8 / bandwidth."""
  rtt, bw = NETWORKS[network]
  return messages * rtt + bytes_sent * 8 / bw


def _inputs(rng, h: int, t: int, e: int):
  q = (rng.standard_normal((h, e)) / np.sqrt(e)).astype(np.float32)  # scaled, as W_q folds it
  k = rng.standard_normal((h, t, e)).astype(np.float32)
  v = rng.standard_normal((h, t, e)).astype(np.float32)
  return q, k, v


def _bounds(k: np.ndarray, size: int):
  h, t, e = k.shape
  kb = k.reshape(h, t // size, size, e)
  return kb.max(2), kb.min(2)


def _row(r, ref=None) -> dict:
  out = {"send_bytes": r.send_bytes, "send_actions": r.send_actions, "recv_bytes": r.recv_bytes,
         "recv_actions": r.recv_actions, "sim_s": r.seconds}
  if ref is not None:
    out["max_abs_err"] = float(np.max(np.abs(r.outputs[0] - ref)))
  return out


def _finish(row: dict) -> dict:
  for net in NETWORKS:
    row[f"{net.lower()}_ms"] = 1e3 * latency(row["send_bytes"], row["send_actions"], net)
  row["mb"] = row["send_bytes"] / 1e6
  return row


def measure(worker, protocol: str, t: int, statics: list[float], keep: float, share: int,
            stabilisers: list[str], h: int, e: int, seed: int, progress=None,
            scores: tuple[str, ...] = ("linear",)) -> list[dict]:
  """Rows for one protocol and cache length: the baselines, then MPCache's settings."""
  from mpc import secure
  rng = np.random.default_rng(seed + t)
  q, k, v = _inputs(rng, h, t, e)
  ref_full = np.asarray(secure.full_deferred(q, k, v))
  rows = []

  def tick(label):
    if progress is not None:
      progress.set_postfix_str(f"{protocol} T={t} {label}")
      progress.update(1)

  for fn in ("full_softmax", "full_deferred"):
    rows.append(_finish({"protocol": protocol, "T": t, "method": fn,
                         **_row(worker.run(fn, q, k, v, protocol=protocol), ref_full)}))
    tick(fn)
  for s in statics:
    ts = max(4, round(s * t / SIZE)) * SIZE  # the statically kept tokens, whole clusters
    c = ts // SIZE
    n_keep = max(1, math.ceil(keep * (c - 2)))
    attended = (n_keep + 2) * SIZE
    qs, ks, vs = _inputs(rng, h, ts, e)
    hi, lo = _bounds(ks, SIZE)
    base = {"protocol": protocol, "T": t, "static": s, "kept_tokens": ts, "keep": keep,
            "clusters_selected": n_keep, "attended_tokens": attended}
    ref_topk = np.asarray(secure.naive_topk(qs, ks, vs, keep=attended))
    rows.append(_finish({**base, "method": "naive_topk", **_row(
        worker.run("naive_topk", qs, ks, vs, protocol=protocol, keep=attended), ref_topk)}))
    tick(f"naive_topk s={s}")
    upd = worker.run("update_bounds", hi, lo, ks[:, -1], protocol=protocol, cluster=c - 1)
    for st, sc in [(st, sc) for sc in scores for st in stabilisers]:
      kw = dict(size=SIZE, keep=n_keep, length=ts, stabiliser=st, score=sc)
      ref, sel = secure.mpcache_step(qs, ks, vs, hi, lo, **kw)
      sel_r = worker.run("mpcache_step", qs, ks, vs, hi, lo, protocol=protocol, **kw)
      shr_r = worker.run("mpcache_shared", qs, ks, vs, hi, lo, np.asarray(sel),
                         protocol=protocol, **kw)
      same = bool((np.round(sel_r.outputs[1]) == np.asarray(sel)).all())
      parts = {"select": _row(sel_r, np.asarray(ref)), "shared": _row(shr_r, np.asarray(ref)),
               "bounds": _row(upd)}
      step = {key: (parts["select"][key] + (share - 1) * parts["shared"][key]) / share
              + parts["bounds"][key] for key in ("send_bytes", "send_actions", "recv_bytes",
                                                 "recv_actions")}
      label = f"{st} max" if sc == "linear" else f"{st} max, {sc} score"
      rows.append(_finish({**base, "method": f"mpcache ({label})", "stabiliser": st,
                           "score": sc, "share": share, **step, "sim_s": sel_r.seconds,
                           "max_abs_err": parts["select"]["max_abs_err"],
                           "selection_equals_plaintext": same, "parts": parts}))
      tick(f"mpcache s={s} {st} {sc}")
  by = {r["method"]: r for r in rows if "static" not in r}
  for r in rows:
    for name in ("full_deferred", "full_softmax"):
      b = by[name]
      short = "deferred" if name == "full_deferred" else "softmax"
      r[f"bytes_x_vs_{short}"] = b["send_bytes"] / max(r["send_bytes"], 1)
      r[f"lan_x_vs_{short}"] = b["lan_ms"] / max(r["lan_ms"], 1e-9)
      r[f"wan_x_vs_{short}"] = b["wan_ms"] / max(r["wan_ms"], 1e-9)
  return rows


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  protocols = sorted({r["protocol"] for r in rows})
  fig, axes = plt.subplots(len(protocols), 2, figsize=(11, 3.6 * len(protocols)), squeeze=False)
  for pi, proto in enumerate(protocols):
    pr = [r for r in rows if r["protocol"] == proto]
    labels = sorted({(r["method"], r.get("static")) for r in pr}, key=str)
    for (m, s) in labels:
      pts = sorted((r["T"], r) for r in pr if r["method"] == m and r.get("static") == s)
      name = m if s is None else f"{m}, static {s:g}"
      for ai, key in enumerate(("mb", "lan_ms")):
        axes[pi, ai].plot([t for t, _ in pts], [r[key] for _, r in pts], marker="o",
                          label=name, linestyle="-" if s is None else "--")
    for ai, title in enumerate(("MB sent by party 0", "modelled LAN latency (ms)")):
      ax = axes[pi, ai]
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("cached tokens T")
      ax.set_title(f"{proto}: {title}")
      ax.grid(alpha=0.3)
  axes[0, 1].legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench mpc")
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  ap.add_argument("--protocols", nargs="+", default=["ABY3", "CHEETAH"])
  ap.add_argument("--static", type=float, nargs="+", default=[0.5, 0.25],
                  help="share of the T tokens that static eviction keeps")
  ap.add_argument("--keep", type=float, default=0.2, help="share of the clusters selected")
  ap.add_argument("--share", type=int, default=2, help="layers per selection (cross-layer)")
  ap.add_argument("--stabilisers", nargs="+", default=["exact", "cluster"])
  ap.add_argument("--scores", nargs="+", default=["linear"], choices=("linear", "upper"),
                  help="cluster scores: the paper's linear one, Quest's upper bound")
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--quick", action="store_true", help="toy sizes (T 256 and 512, 2 heads)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None)
  ap.add_argument("--name", default="mpc")
  args = ap.parse_args(argv)
  from mpc import spu
  for p in args.protocols:
    if p not in spu.PROTOCOLS:
      raise SystemExit(f"unknown protocol {p!r}; known: {', '.join(spu.PROTOCOLS)}")
  for s in args.static + [args.keep]:
    if not 0 < s <= 1:
      raise SystemExit(f"--static and --keep are shares in (0, 1], got {s}")
  if args.share < 1:
    raise SystemExit(f"--share must be >= 1, got {args.share}")
  if args.quick:
    args.lengths, args.heads, args.head_dim = [256, 512], 2, 16
  from tqdm import tqdm
  out_dir = Path(args.out) if args.out else RESULTS_DIR
  res = {"heads": args.heads, "head_dim": args.head_dim, "field": "FM64", "cluster": SIZE,
         "keep": args.keep, "share": args.share, "networks": {
             k: {"rtt_ms": 1e3 * v[0], "gbit_s": v[1] / 1e9} for k, v in NETWORKS.items()},
         "rows": []}
  t0 = time.time()
  total = len(args.protocols) * len(args.lengths) * (
      2 + len(args.static) * (1 + len(args.stabilisers) * len(args.scores)))
  with spu.Worker() as worker, tqdm(total=total, desc="bench mpc") as bar:
    res["spu"] = worker.versions
    for proto in args.protocols:
      for t in args.lengths:
        res["rows"] += measure(worker, proto, t, args.static, args.keep, args.share,
                               args.stabilisers, args.heads, args.head_dim, args.seed, bar,
                               tuple(args.scores))
        res["wall_s"] = time.time() - t0
        path = write_results(args.name, res, out_dir)
  png = out_dir / f"{args.name}_{path.stem.rsplit('_', 1)[1]}.png"
  plot(res["rows"], png)
  res["plots"] = [png.name]
  path = write_results(args.name, res, out_dir)
  print(f"\n{'protocol':8} {'T':>5} {'method':22} {'static':>6} {'MB':>8} {'msgs':>6} "
        f"{'LAN ms':>8} {'x bytes':>7} {'x LAN':>6}  (x: vs full_deferred)")
  for r in res["rows"]:
    print(f"{r['protocol']:8} {r['T']:5d} {r['method']:22} {r.get('static', 1.0):6.2f} "
          f"{r['mb']:8.2f} {r['send_actions']:6.0f} {r['lan_ms']:8.1f} "
          f"{r['bytes_x_vs_deferred']:7.2f} {r['lan_x_vs_deferred']:6.2f}")
  print(f"results: {path}")
  return res


if __name__ == "__main__":
  main()
