"""S2-Attention benchmarks: decode-cache bytes, train step time and decode tokens/s vs dense.

    python -m experiments bench s2 cache                  # analytic 8K/32K/128K + real 8K (CPU ok)
    python -m experiments bench s2 all --quick            # everything at toy sizes on the CPU
    python -m experiments bench s2 all                    # GPU: 32K train step, 32K decode

`cache` writes results/s2_cache_<backend>.json: bytes of the per-head compressed cache
(kvcache.s2_cache) against the dense KVCache for the base model (12 layers, 12 query / 4 KV
heads, head dim 64, bf16) at 8K, 32K and 128K tokens, per pattern variant (stride 8 / 16,
per-query-head patterns whose KV head keeps its group's union, per-KV-head patterns, an MHA
model, hybrids with one dense layer in four), plus a real allocation and compression at 8K.
`train` and `decode` write results/s2_bench_<backend>.json: median train step (forward,
backward, AdamW) of the dense, all-S2 and hybrid (one dense layer in four) stacks, and decode
tokens/s of the dense model with the dense cache against S2 models (per-query-head and
per-KV-head patterns) with the compressed cache, after a prefill of --seq tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from colm.config import ModelConfig
from experiments.results import write_results
from kvcache.s2_cache import cache_bytes, plan_layers

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
                   "slots_per_kv_head": [p.budget for p in plans]})
  return rows


def real_cache_8k(base: ModelConfig, variant: dict, n: int = 8192, seed: int = 0) -> dict:
  """Allocates the dense and the compressed cache at n tokens, compresses a dense cache of
  random keys into the S2 one, and counts the tokens actually held."""
  from kvcache.cache import KVCache, init_cache
  from kvcache.s2_cache import compress, init_s2_cache
  cfg = base.replace(**variant, max_seq_len=n)
  plans = plan_layers(cfg, n)
  dense = init_cache(cfg, 1, n)
  dense = KVCache(dense.k, dense.v, jnp.full((1,), n, jnp.int32))  # every position filled
  s2 = init_s2_cache(plans, 1, cfg.head_dim, cfg.dtype)
  alloc = s2.nbytes()
  s2 = jax.jit(compress, static_argnums=1)(dense, plans, cache=s2)
  held = s2.held_tokens()  # [L, B, K]
  return {"tokens": n, "dense_bytes_allocated": dense.nbytes(), "s2_bytes_allocated": alloc,
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


def time_decode(model, context: int, new: int, s2: bool) -> dict:
  """Prefill `context` random tokens (batch 1), then time `new` single-token decode steps."""
  from flax import nnx

  from kvcache.cache import init_cache
  from kvcache.decode import decode_step, prefill
  from s2attn.decode import s2_decode_step, s2_prefill
  cfg = model.cfg
  graphdef, params = nnx.split(model)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, context)),
                     jnp.int32)
  lengths = jnp.full((1,), context, jnp.int32)
  max_len = context + new + 1
  t0 = time.perf_counter()
  if s2:
    plans = plan_layers(cfg, max_len)
    logits, cache = s2_prefill(graphdef, params, toks, lengths, plans)

    def step(tok, cache):
      return s2_decode_step(graphdef, params, tok, cache, plans)
  else:
    logits, cache = prefill(graphdef, params, toks, lengths, init_cache(cfg, 1, max_len))

    def step(tok, cache):
      return decode_step(graphdef, params, tok, cache)
  tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  jax.block_until_ready(cache)
  prefill_s = time.perf_counter() - t0
  logits, cache = step(tok, cache)  # compile
  jax.block_until_ready(logits)
  t0 = time.perf_counter()
  for _ in range(new):
    logits, cache = step(jnp.argmax(logits, -1).astype(jnp.int32), cache)
  jax.block_until_ready(logits)
  dt = time.perf_counter() - t0
  return {"context": context, "new_tokens": new, "prefill_s": prefill_s,
          "decode_tokens_per_s": new / dt, "decode_ms_per_token": 1e3 * dt / new,
          "cache_bytes": int(cache.nbytes())}


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m experiments bench s2",
                               description=__doc__.splitlines()[0])
  ap.add_argument("what", choices=["cache", "train", "decode", "all"])
  ap.add_argument("--quick", action="store_true", help="toy sizes (CPU)")
  ap.add_argument("--seq", type=int, default=None, help="train / decode context")
  ap.add_argument("--steps", type=int, default=None, help="timed train steps")
  ap.add_argument("--new", type=int, default=None, help="timed decode tokens")
  ap.add_argument("--stride", type=int, default=8)
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
    dec = {}
    new = args.new or (8 if q else 64)
    for name in ("dense", "s2", "s2_per_kv_head"):
      cfg = _bench_cfg(**shape, seq=seq + new + 1, dtype=dtype, layer_attn=stacks[name])
      model = nnx.jit(lambda cfg=cfg: Decoder(cfg, rngs=nnx.Rngs(0)))()
      dec[name] = time_decode(model, seq, new, s2=name != "dense")
      print(name, dec[name], flush=True)
    for name in ("s2", "s2_per_kv_head"):
      dec[name]["speedup_vs_dense"] = (dec[name]["decode_tokens_per_s"]
                                       / dec["dense"]["decode_tokens_per_s"])
      dec[name]["cache_ratio_vs_dense"] = dec["dense"]["cache_bytes"] / dec[name]["cache_bytes"]
    payload["decode"] = dec
  p = write_results("s2_bench" + ("_quick" if q else ""), payload, args.out)
  print(f"wrote {p}")


if __name__ == "__main__":
  main()
