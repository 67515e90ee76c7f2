"""Prefill onto a filled cache: a long prompt in chunks against the same prompt in one piece.

    python -m experiments bench prefill                       # GPU: 32K in 4K chunks
    python -m experiments bench prefill --context 512 --chunk 128 --quick     # CPU

The model is the `bench s2` shape (4 layers, d_model 1024, 16 heads, 4 KV heads, bf16). One-shot
prefill runs each layer's attention function over the prompt (cuDNN on GPU); chunked prefill
runs the first chunk so and every later chunk onto the cache (its queries attend the stored
slots by position). Both write the same cache; the ratio of their median times is the cost of
chunking. Writes results/prefill_<backend>.json.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from experiments.results import trace_to, write_results
from kvcache import init_cache, prefill, prefill_chunked


def bench(cfg: ModelConfig, context: int, chunk: int, batch: int, repeats: int,
          profile: str | None = None) -> dict:
  model = nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))()
  graphdef, params = nnx.split(model)
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, context)).astype(np.int32)
  lengths = np.full((batch,), context, np.int32)

  def one():
    return prefill(graphdef, params, toks, lengths, init_cache(cfg, batch, context))

  def chunked():
    return prefill_chunked(graphdef, params, toks, lengths, init_cache(cfg, batch, context),
                           chunk)

  out = {}
  for name, fn in (("one_shot", one), ("chunked", chunked)):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    out[name + "_ms"] = 1e3 * float(np.median(times))
  if profile:
    with trace_to(profile):
      jax.block_until_ready(chunked())
  # Same result: the last chunk's logits equal the one-shot logits there.
  a, _ = one()
  b, _ = chunked()
  out["max_logit_diff"] = float(np.max(np.abs(np.asarray(a[:, -chunk:], np.float32)
                                              - np.asarray(b[:, -chunk:], np.float32))))
  out["ratio"] = out["chunked_ms"] / out["one_shot_ms"]
  return out


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench prefill",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--context", type=int, default=32768)
  ap.add_argument("--chunk", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="toy model (CPU)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--profile", default=None,
                  help="write a profiler trace (.xplane.pb) of one chunked prefill here")
  args = ap.parse_args(argv)
  if args.context % args.chunk:
    raise SystemExit(f"--context {args.context} must be a multiple of --chunk {args.chunk}")
  shape = dict(d_model=64, n_heads=16, head_dim=16) if args.quick else dict(
      d_model=1024, n_heads=16, head_dim=64)
  cfg = ModelConfig(vocab_size=4096, n_layers=4, n_kv_heads=4, ffn_dim=int(2.75 * shape[
      "d_model"]), max_seq_len=args.context, dtype="float32" if args.quick else "bfloat16",
      **shape)
  r = bench(cfg, args.context, args.chunk, args.batch, args.repeats, args.profile)
  r.update(context=args.context, chunk=args.chunk, batch=args.batch)
  path = write_results("prefill" + ("_quick" if args.quick else ""), {
      "model": f"4 layers, d_model {cfg.d_model}, 16 heads, 4 KV heads, {cfg.dtype}",
      "rows": [r]}, args.out)
  print(f"\n{'context':>8} {'chunk':>6} {'one-shot ms':>12} {'chunked ms':>11} {'ratio':>6}")
  print(f"{args.context:8d} {args.chunk:6d} {r['one_shot_ms']:12.2f} {r['chunked_ms']:11.2f} "
        f"{r['ratio']:6.2f}")
  print(f"wrote {path}")
  return r


if __name__ == "__main__":
  main()
