"""S2-Attention benchmarks: decode-cache bytes, train step time and decode tokens/s vs dense.

    python -m experiments bench s2 cache                  # analytic 8K/32K/128K + real 8K (CPU ok)
    python -m experiments bench s2 all --quick            # everything at toy sizes on the CPU
    python -m experiments bench s2 all                    # GPU: 32K train step, 32K decode

`cache` writes results/s2_cache_<backend>.json: bytes of the per-head compressed cache (S2's
eviction policy, s2attn.cache) against the dense cache for the base model (12 layers, 12 query /
4 KV heads, head dim 64, bf16) at 8K, 32K and 128K tokens, per pattern variant (stride 8 / 16,
per-query-head patterns whose KV head keeps its group's union, per-KV-head patterns, an MHA
model, hybrids with one dense layer in four), plus a real allocation and compression at 8K.
`all` writes results/s2_bench_<backend>.json (`train` or `decode` alone: s2_train_*.json,
s2_decode_*.json): median train step (forward,
backward, AdamW) of the dense, all-S2 and hybrid (one dense layer in four) stacks, and decode
tokens/s (batch --batch, default 8) of the dense model with the full cache against S2 models
(per-query-head and per-KV-head patterns) with S2's eviction policy, after a prefill of --seq
tokens, all through kvcache's one decode loop: % of the bandwidth roofline and the S2 speed-up
beside its ideal (the ratio of bytes read per token, weights included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from colm.config import ModelConfig
from experiments.results import pct, write_results
from s2attn import cache_bytes, plan_layers

LENGTHS = (8192, 32768, 131072)


def _variants(n_layers: int, local_blocks: int, block_size: int):
  """name -> (ModelConfig overrides) for the cache table."""
  out = {}
  for stride in (8, 16):
    for per_kv in (False, True):
      spec = (f"s2:block_size={block_size},local_blocks={local_blocks},vert_stride={stride}"
              + (",per_kv_head=true" if per_kv else ""))
      name = f"v{stride}_{'per_kv_head' if per_kv else 'per_head'}"
      out[name] = dict(layer_attn=(spec,) * n_layers)
      out[name + "_hybrid4"] = dict(layer_attn=tuple(
          "auto" if i % 4 == 3 else spec for i in range(n_layers)))
    out[f"v{stride}_mha"] = dict(n_kv_heads=12, layer_attn=(
        f"s2:block_size={block_size},local_blocks={local_blocks},vert_stride={stride}",)
        * n_layers)
  return out


def cache_table(base: ModelConfig, lengths=LENGTHS, batch: int = 1, local_blocks: int = 8,
                block_size: int = 64) -> list[dict]:
  """Analytic bytes (K, V and the int32 position index) per variant and length."""
  from s2attn.attention import s2_options_from_spec
  rows = []
  itemsize = jnp.dtype(base.dtype).itemsize
  for name, ov in _variants(base.n_layers, local_blocks, block_size).items():
    cfg = base.replace(**ov)
    o = s2_options_from_spec(cfg.layer_attn[0])
    covers = o.pattern.covers(cfg.n_heads, cfg.n_kv_heads if o.per_kv_head else None)
    for n in lengths:
      plans = plan_layers(cfg, n)
      dense = 2 * cfg.n_layers * batch * cfg.n_kv_heads * n * cfg.head_dim * itemsize
      s2 = cache_bytes(plans, batch, cfg.head_dim, itemsize)
      s2_kv = cache_bytes(plans, batch, cfg.head_dim, itemsize, include_positions=False)
      rows.append({"variant": name, "tokens": n, "n_kv_heads": cfg.n_kv_heads,
                   "heads_cover_context": covers, "dense_bytes": dense, "s2_bytes": s2,
                   "s2_kv_bytes": s2_kv, "ratio": dense / s2, "ratio_kv_only": dense / s2_kv,
                   "slots_per_kv_head": [list(p.kv_budgets) for p in plans]})
  return rows


def real_cache_8k(base: ModelConfig, variant: dict, n: int = 8192, seed: int = 0) -> dict:
  """Allocates the dense cache at n tokens with every slot filled, applies S2's eviction policy
  (which repacks into per-KV-head budgets), and counts the bytes and tokens actually held."""
  from kvcache import apply_policy, init_cache, map_positions
  from s2attn import S2Eviction
  cfg = base.replace(**variant, max_seq_len=n)
  plans = plan_layers(cfg, n)
  dense = init_cache(cfg, 1, n)
  dense = map_positions(dense, lambda li, h0, pos: jnp.broadcast_to(
      jnp.arange(pos.shape[-1], dtype=jnp.int32), pos.shape))
  dense = dataclasses.replace(dense, lengths=jnp.full((1,), n, jnp.int32))  # all filled
  dense_bytes = dense.nbytes()
  s2 = apply_policy(S2Eviction(plans), dense)
  held = s2.held_tokens()  # [L, B, K]
  return {"tokens": n, "dense_bytes_allocated": dense_bytes, "s2_bytes_allocated": s2.nbytes(),
          "s2_bytes_analytic": cache_bytes(plans, 1, cfg.head_dim, jnp.dtype(cfg.dtype).itemsize),
          "held_tokens_per_kv_head_layer0": held[0, 0].tolist(),
          "held_tokens_total": int(held.sum()), "dense_tokens_total": int(
              cfg.n_layers * cfg.n_kv_heads * n),
          "held_fraction": float(held.sum() / (cfg.n_layers * cfg.n_kv_heads * n))}


# ------------------------------------------------------------------------------------ training


def _bench_cfg(d_model: int, n_layers: int, heads: int, kv_heads: int, seq: int, dtype: str,
               layer_attn) -> ModelConfig:
  return ModelConfig(vocab_size=4096, d_model=d_model, n_layers=n_layers, n_heads=heads,
                     n_kv_heads=kv_heads, head_dim=d_model // heads, ffn_dim=int(2.75 * d_model),
                     max_seq_len=seq, dtype=dtype, layer_attn=tuple(layer_attn))


def time_train(mcfg: ModelConfig, batch: int, seq: int, steps: int) -> dict:
  from experiments.config import TrainConfig
  from experiments.train import Trainer
  tcfg = TrainConfig(batch_size=batch, seq_len=seq, steps=1000, warmup_steps=10)
  trainer = Trainer(tcfg, model_cfg=mcfg)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  b = rng.integers(0, mcfg.vocab_size, (batch, seq + 1), dtype=np.int32)
  t0 = time.perf_counter()
  state, m = trainer.step(state, b)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = trainer.step(state, b)
    jax.block_until_ready((state.params, m))
    times.append(time.perf_counter() - t0)
  return {"step_s": float(np.median(times)), "compile_s": compile_s,
          "tokens_per_s": batch * seq / float(np.median(times)), "loss": float(m["loss"])}


# ------------------------------------------------------------------------------------- decoding


def time_decode(model, context: int, new: int, s2: bool, batch: int = 1,
                bandwidth: float | None = None, repeats: int = 3) -> dict:
  """Prefill `context` random tokens per sequence, then greedy-decode `new` tokens in the one
  compiled decode loop (kvcache.decode_loop); S2 models with S2's eviction policy (per-KV-head
  budgets, eviction after every step). Bytes per token count the weights and the K/V, positions
  and masks actually held (read by decode attention)."""
  from flax import nnx

  from kvcache import SamplingConfig, apply_policy, decode_loop, init_cache, prefill
  from s2attn import s2_compression
  cfg = model.cfg
  graphdef, params = nnx.split(model)
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, context)).astype(np.int32)
  lengths = np.full((batch,), context, np.int32)
  max_len = context + new + 16
  comp = s2_compression(cfg, max_len) if s2 else None
  stops = jnp.zeros((0,), jnp.int32)

  def run():
    cache = init_cache(cfg, batch, context if s2 else max_len)
    t0 = time.perf_counter()
    logits, cache = prefill(graphdef, params, toks, lengths, cache)
    if comp is not None:
      cache = apply_policy(comp.policy, cache)
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    jax.block_until_ready((first, cache))
    t1 = time.perf_counter()
    out, n, cache = decode_loop(graphdef, params, first, cache, jax.random.key(0), stops,
                                max_new_tokens=new, sampling=SamplingConfig(),
                                compression=None if comp is None else comp)
    jax.block_until_ready(out)
    return t1 - t0, time.perf_counter() - t1, int(n), cache

  run()  # compile
  runs = [run() for _ in range(repeats)]
  steps = runs[0][2] - 1
  decode_s = float(np.median([r[1] for r in runs]))
  cache = runs[-1][3]
  held = cache.held_tokens()  # [L, B, K] at the end
  slot_bytes = 2 * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  # K/V read per step averaged over the run: dense grows from context to context + steps; S2
  # holds about its budget (the held count at the end is the steady state).
  kv_bytes = (batch * cfg.n_layers * cfg.n_kv_heads * (context + steps / 2) * slot_bytes
              if not s2 else float(held.sum()) * slot_bytes)
  step_s = decode_s / steps
  r = {"context": context, "batch": batch, "new_tokens": new, "steps": steps,
       "prefill_s": float(np.median([r[0] for r in runs])),
       "decode_tokens_per_s": batch * steps / decode_s, "decode_ms_per_token": 1e3 * step_s,
       "cache_bytes": int(cache.nbytes()), "param_bytes": param_bytes,
       "kv_bytes_per_step": kv_bytes, "bytes_per_step": param_bytes + kv_bytes}
  if bandwidth:
    r["roofline_step_ms"] = 1e3 * r["bytes_per_step"] / bandwidth
    r["roofline_fraction"] = r["roofline_step_ms"] / r["decode_ms_per_token"]
  return r


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m experiments bench s2",
                               description=__doc__.splitlines()[0])
  ap.add_argument("what", choices=["cache", "train", "decode", "all"])
  ap.add_argument("--quick", action="store_true", help="toy sizes (CPU)")
  ap.add_argument("--seq", type=int, default=None, help="train / decode context")
  ap.add_argument("--steps", type=int, default=None, help="timed train steps")
  ap.add_argument("--new", type=int, default=None, help="timed decode tokens")
  ap.add_argument("--stride", type=int, default=8)
  ap.add_argument("--batch", type=int, default=None, help="decode batch (default 8; 1 quick)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  q = args.quick
  if args.what in ("cache", "all"):
    base = ModelConfig.base()
    rows = cache_table(base, LENGTHS[:1] if q else LENGTHS)
    real = {name: real_cache_8k(base, ov, 1024 if q else 8192)
            for name, ov in _variants(base.n_layers, 8, 64).items()
            if name in ("v8_per_head", "v8_per_kv_head", "v8_per_head_hybrid4")}
    p = write_results("s2_cache", {
        "model": "base (12 layers, 12 heads, 4 KV heads, E=64, bf16)",
        "local_window_tokens": 512, "rows": rows, "real": real}, args.out)
    print(json.dumps({f"{r['variant']}@{r['tokens']}": round(r["ratio"], 2) for r in rows},
                     indent=0))
    print("real:", json.dumps(real, indent=0))
    print(f"wrote {p}")
  if args.what == "cache":
    return
  seq = args.seq or (512 if q else 32768)
  bs, lb = (16, 4) if q else (64, 8)
  s2 = f"s2:block_size={bs},local_blocks={lb},vert_stride={args.stride}"
  shape = dict(d_model=64, n_layers=4, heads=16, kv_heads=4) if q else dict(
      d_model=1024, n_layers=4, heads=16, kv_heads=4)
  dtype = "float32" if q else "bfloat16"
  stacks = {"dense": ["auto"] * 4, "s2": [s2] * 4, "s2_hybrid4": [s2] * 3 + ["auto"],
            "s2_per_kv_head": [s2 + ",per_kv_head=true"] * 4}
  payload = {"seq": seq, "stride": args.stride, "block_size": bs, "local_blocks": lb,
             "shape": shape, "dtype": dtype}
  if args.what in ("train", "all"):
    tr = {}
    for name in ("dense", "s2", "s2_hybrid4"):
      layers = stacks[name]
      tr[name] = time_train(_bench_cfg(**shape, seq=seq, dtype=dtype, layer_attn=layers), 1, seq,
                            args.steps or (2 if q else 10))
      print(name, tr[name], flush=True)
    for name in tr:
      tr[name]["speedup_vs_dense"] = tr["dense"]["step_s"] / tr[name]["step_s"]
    payload["train"] = tr
  if args.what in ("decode", "all"):
    from flax import nnx

    from colm.model import Decoder
    from experiments.bench_decode import copy_bandwidth
    bw = copy_bandwidth(1 << 30 if jax.default_backend() == "gpu" else 1 << 24)
    dec = {}
    new = args.new or (8 if q else 128)
    batch = args.batch or (1 if q else 8)
    for name in ("dense", "s2", "s2_per_kv_head"):
      cfg = _bench_cfg(**shape, seq=seq + new + 16, dtype=dtype, layer_attn=stacks[name])
      model = nnx.jit(lambda cfg=cfg: Decoder(cfg, rngs=nnx.Rngs(0)))()
      dec[name] = time_decode(model, seq, new, s2=name != "dense", batch=batch,
                              bandwidth=bw if jax.default_backend() == "gpu" else None)
      print(name, dec[name], flush=True)
    for name in ("s2", "s2_per_kv_head"):
      d = dec[name]
      d["speedup_vs_dense"] = d["decode_tokens_per_s"] / dec["dense"]["decode_tokens_per_s"]
      d["ideal_speedup"] = dec["dense"]["bytes_per_step"] / d["bytes_per_step"]
      d["speedup_over_ideal"] = d["speedup_vs_dense"] / d["ideal_speedup"]
      d["cache_ratio_vs_dense"] = dec["dense"]["cache_bytes"] / d["cache_bytes"]
    payload["decode"] = dec
    payload["copy_bandwidth_GBps"] = bw / 1e9
    print(f"\n{'decode':15} {'batch':>5} {'ms/tok':>8} {'tok/s':>9} {'roofline':>8} "
          f"{'speed-up':>8} {'ideal':>6} {'of ideal':>8}")
    for name, d in dec.items():
      print(f"{name:15} {d['batch']:5d} {d['decode_ms_per_token']:8.3f} "
            f"{d['decode_tokens_per_s']:9,.0f} {pct(d.get('roofline_fraction')):>8} "
            f"{d.get('speedup_vs_dense', 1.0):8.2f} {d.get('ideal_speedup', 1.0):6.2f} "
            f"{pct(d.get('speedup_over_ideal', 1.0)):>8}")
  # `all` writes both parts to s2_bench; one part alone gets its own file (s2_train, s2_decode),
  # so a decode run does not replace the train results.
  name = {"all": "s2_bench", "train": "s2_train", "decode": "s2_decode"}[args.what]
  p = write_results(name + ("_quick" if q else ""), payload, args.out)
  print(f"wrote {p}")


if __name__ == "__main__":
  main()
