"""Decode throughput against the memory-bandwidth roofline.

    python -m experiments bench decode                       # GPU: large b1, base b1, base b32
    python -m experiments bench decode --variants small:1 --prompt 64 --new 64    # CPU

Greedy decoding of --new tokens after a --prompt-token prompt, in the one compiled while loop
that `generate` uses. The roofline time of a step is (bytes of weights + bytes of KV actually
attended) / measured copy bandwidth; the fraction reached is roofline time / measured step time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from experiments.results import pct, trace_to, write_results
from kvcache import SamplingConfig, decode_loop, init_cache, prefill


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
  """Device memory bandwidth in bytes/s, counting bytes read plus written.

  The best of three copies that XLA cannot elide (x + 1 in bf16 and float32, and a reversal),
  each timed over `repeats` back-to-back calls with one sync, so dispatch does not count.
  """
  best = 0.0
  for dtype, fn in ((jnp.bfloat16, lambda a: a + 1), (jnp.float32, lambda a: a + 1),
                    (jnp.float32, lambda a: a[::-1])):
    n = nbytes // jnp.dtype(dtype).itemsize
    x = jax.random.normal(jax.random.key(0), (n,), dtype)
    f = jax.jit(fn)
    y = f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
      y = f(y)
    y.block_until_ready()
    best = max(best, 2 * nbytes * repeats / (time.perf_counter() - t0))
  return best


def bench_one(preset: str, batch: int, prompt: int, new: int, repeats: int, bandwidth: float,
              dtype: str = "bfloat16", profile: str | None = None,
              decode_attn: str = "auto") -> dict:
  cfg = ModelConfig.preset(preset, max_seq_len=prompt + new, dtype=dtype, param_dtype=dtype)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
  lengths = jnp.full((batch,), prompt, jnp.int32)
  sampling = SamplingConfig()
  stops = jnp.zeros((0,), jnp.int32)

  def run():
    cache = init_cache(cfg, batch, prompt + new, decode_attn=decode_attn)
    t0 = time.perf_counter()
    logits, cache = prefill(graphdef, params, tokens, lengths, cache)
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    first.block_until_ready()
    t1 = time.perf_counter()
    out, n, cache = decode_loop(graphdef, params, first, cache, jax.random.key(0), stops,
                                max_new_tokens=new, sampling=sampling)
    out.block_until_ready()
    return t1 - t0, time.perf_counter() - t1, int(n)

  t0 = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t0
  runs = [run() for _ in range(repeats)]
  if profile:
    with trace_to(profile):
      run()
  prefill_s = float(np.median([r[0] for r in runs]))
  decode_s = float(np.median([r[1] for r in runs]))
  steps = runs[0][2] - 1  # decode steps run (the first token comes from prefill)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # bf16 K and V
  mean_len = prompt + 1 + (steps - 1) / 2
  kv_bytes = batch * kv_per_token * mean_len  # KV attended per step, averaged over the run
  kv_full = batch * kv_per_token * (prompt + new)  # what reading the whole cache would cost
  step_s = decode_s / steps
  roof = (param_bytes + kv_bytes) / bandwidth
  on_gpu = jax.default_backend() == "gpu"  # on a CPU small weights sit in cache: no roofline
  return {"preset": preset, "batch": batch, "prompt": prompt, "new_tokens": new,
          "decode_attn": decode_attn,
          "params": cfg.num_params(), "param_bytes": param_bytes, "kv_bytes_per_step": kv_bytes,
          "compile_s": compile_s, "prefill_ms": 1e3 * prefill_s, "decode_s": decode_s,
          "step_ms": 1e3 * step_s, "tokens_per_s": batch * steps / decode_s,
          "roofline_step_ms": 1e3 * roof if on_gpu else None,
          "roofline_fraction": roof / step_s if on_gpu else None,
          "roofline_fraction_full_cache": (param_bytes + kv_full) / bandwidth / step_s
          if on_gpu else None}


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench decode")
  ap.add_argument("--variants", default="large:1,base:1,base:32",
                  help="preset:batch[:decode_attn] triples, comma-separated (decode_attn: auto, "
                       "pallas or reference; default auto)")
  ap.add_argument("--prompt", type=int, default=1024)
  ap.add_argument("--new", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--out", default=None)
  ap.add_argument("--name", default="decode")
  ap.add_argument("--profile", default=None,
                  help="write a profiler trace (.xplane.pb) of one run of the first variant here")
  args = ap.parse_args(argv)
  bw = copy_bandwidth(1 << 30 if jax.default_backend() == "gpu" else 1 << 26)
  print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
  rows = []
  for v in args.variants.split(","):
    preset, batch, *attn = v.split(":")
    r = bench_one(preset, int(batch), args.prompt, args.new, args.repeats, bw, args.dtype,
                  profile=args.profile if not rows else None,
                  decode_attn=attn[0] if attn else "auto")
    rows.append(r)
    print(f"{preset} b{batch} {r['decode_attn']}: {r['tokens_per_s']:,.0f} tok/s, "
          f"{r['step_ms']:.3f} ms/step, {pct(r['roofline_fraction'])} of roofline", flush=True)
  path = write_results(args.name, {"copy_bandwidth_GBps": bw / 1e9, "rows": rows}, args.out)
  print(f"\n{'preset':7} {'batch':>5} {'attn':>9} {'params':>8} {'ms/step':>8} {'roof ms':>8} "
        f"{'tok/s':>9} {'roofline':>8}")
  for r in rows:
    roof_ms = "n/a" if r["roofline_step_ms"] is None else f"{r['roofline_step_ms']:.3f}"
    print(f"{r['preset']:7} {r['batch']:5d} {r['decode_attn']:>9} {r['params'] / 1e6:7.0f}M "
          f"{r['step_ms']:8.3f} "
          f"{roof_ms:>8} {r['tokens_per_s']:9,.0f} {pct(r['roofline_fraction']):>8}")
  print(f"wrote {path}")
  return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
  main()
