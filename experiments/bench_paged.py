"""Paged KV memory under prefix sharing: pages the pool actually holds against the tree optimum.

    python -m experiments bench paged                 # 64 groups x 16 prompts, 2,048-token prefix
    python -m experiments bench paged --speed         # GPU: paged vs contiguous decode kernels,
                                                      # shared-prefix vs per-sequence attention

Each group is 16 prompts sharing one random prefix, each with its own suffix. Prompts are
admitted through the radix tree (kvcache.RadixTree over a kvcache.PagePool): a prompt reuses the
stored prefix pages and gets pages only for its suffix (plus a copy of a partial last prefix
page). The optimum stores each group's prefix once: groups * ceil(prefix / S) pages plus, per
prompt, the pages its own tokens need (its suffix, and a copy of a partial last prefix page).
Host bookkeeping only (no model, no device arrays), so it runs anywhere; writes
results/paged_memory_<backend>.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.bench_attention import time_ms
from experiments.results import write_results
from kvcache.paged import prefix_groups, shared_paged_attention
from kvcache.pool import PagePool
from kvcache.radix import RadixTree
from pallas_kernels.decode import (
    cache_decode_attention,
    default_block_tokens,
    paged_decode_attention,
    paged_decode_attention_parts,
)


def measure(groups: int, per_group: int, prefix: int, suffix: int, page_size: int,
            seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  # Per prompt, the pages of its own tokens: a copy of a partial last prefix page and the
  # suffix; per group, the prefix's full pages once (a partial one is the first prompt's own).
  own = -(-(prefix % page_size + suffix) // page_size)
  optimum = groups * (prefix // page_size + per_group * own)
  pool = PagePool(int(optimum * 1.1) + 16, page_size)
  tree = RadixTree(pool)
  seq = 0
  for _ in tqdm(range(groups), desc="groups", leave=False):
    stem = rng.integers(0, 32000, prefix).tolist()
    for _ in range(per_group):
      tokens = stem + rng.integers(0, 32000, suffix).tolist()
      m, pages = tree.match(tokens)
      pool.add(seq, pages, m)
      pool.extend(seq, len(tokens) - m)
      tree.insert(tokens[:prefix], pool.table(seq))  # the group prefix, stored once
      seq += 1
  held = pool.pages_in_use
  unshared = groups * per_group * (-(-(prefix + suffix) // page_size))
  return {"groups": groups, "per_group": per_group, "prefix": prefix, "suffix": suffix,
          "page_size": page_size, "pages_held": held, "tree_optimum_pages": optimum,
          "over_optimum": held / optimum - 1, "pages_without_sharing": unshared,
          "saving_vs_unshared": unshared / held, "peak_pages": pool.peak_pages}


def speed(batch: int, context: int, kv_heads: int, group: int, head_dim: int, page_size: int,
          groups: int, per_group: int, prefix: int, suffix: int, repeats: int,
          inner: int = 10) -> dict:
  """Side by side in one run: (1) the paged decode kernel against the contiguous cache kernel
  at equal tokens (pages of the pool shuffled); (2) shared-prefix attention (each group's prefix
  once for all its sequences' queries, merged by log-sum-exp with each suffix read through its
  pages) against per-sequence paged attention over prefix + suffix pages, decode queries. Each
  time is the median over `repeats` samples of `inner` calls dispatched back to back."""
  rng = np.random.default_rng(0)
  dt = jnp.bfloat16
  b, k, g, e, n = batch, kv_heads, group, head_dim, context
  q = jnp.asarray(rng.standard_normal((b, k, g, e)), dt)
  kc, vc = (jnp.asarray(rng.standard_normal((b, k, n, e)), dt) for _ in range(2))
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, k, n))
  q_pos = jnp.full((b,), n - 1, jnp.int32)
  w = n // page_size
  pages = b * w
  perm = rng.permutation(pages).reshape(b, w).astype(np.int32)
  kp = jnp.zeros((k, pages, page_size, e), dt).at[:, perm].set(
      kc.reshape(b, k, w, page_size, e).transpose(1, 0, 2, 3, 4))
  vp = jnp.zeros((k, pages, page_size, e), dt).at[:, perm].set(
      vc.reshape(b, k, w, page_size, e).transpose(1, 0, 2, 3, 4))
  tables = jnp.asarray(perm)
  contiguous_fn, paged_fn = jax.jit(cache_decode_attention), jax.jit(paged_decode_attention)
  contiguous = time_ms(contiguous_fn, (q, kc, vc, pos, q_pos), repeats, inner=inner)
  paged = time_ms(paged_fn, (q, kp, vp, tables, q_pos), repeats, inner=inner)
  a = contiguous_fn(q, kc, vc, pos, q_pos)[0]
  c = paged_fn(q, kp, vp, tables, q_pos)[0]
  err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))))
  # Shared prefix: groups x per_group sequences, decode queries; the pool holds each group's
  # prefix pages once and every sequence's suffix pages.
  ns, npg, nsg = groups * per_group, prefix // page_size, suffix // page_size
  pool_pages = groups * npg + ns * nsg
  kpool, vpool = (jnp.asarray(rng.standard_normal((k, pool_pages, page_size, e)), dt)
                  for _ in range(2))
  pre = np.arange(groups * npg).reshape(groups, npg)
  suf = groups * npg + np.arange(ns * nsg).reshape(ns, nsg)
  full_tables = jnp.asarray(np.concatenate([np.repeat(pre, per_group, 0), suf], 1), jnp.int32)
  qs = jnp.asarray(rng.standard_normal((ns, k, g, e)), dt)
  per_seq = jax.jit(paged_decode_attention)
  per_args = (qs, kpool, vpool, full_tables, jnp.full((ns,), prefix + suffix - 1, jnp.int32))
  t_per = time_ms(per_seq, per_args, repeats, inner=inner)

  groups_ = prefix_groups([(range(gi * per_group, (gi + 1) * per_group), pre[gi])
                           for gi in range(groups)], ns, page_size)
  positions = jnp.full((ns, 1), prefix + suffix - 1, jnp.int32)

  @jax.jit
  def shared(qs, kpool, vpool):
    # kvcache's shared-prefix attention: each group's prefix pages once for all its sequences'
    # query rows (the paged kernel with a group's rows as its rows), merged by log-sum-exp with
    # each sequence's own pages after the prefix.
    o, lse = shared_paged_attention(qs[:, None], kpool, vpool, full_tables, positions, groups_,
                                    kernel=True)
    return o[:, 0], lse[:, 0]

  t_shared = time_ms(shared, (qs, kpool, vpool), repeats, inner=inner)
  # Its two parts, each in a launch of its own: the prefix part (a group's 16 x G query rows
  # as the kernel's rows, over the group's prefix pages) and the own part (each sequence's
  # suffix pages).
  rows = qs.reshape(groups, per_group, k, g, e).transpose(0, 2, 1, 3, 4).reshape(
      groups, k, per_group * g, e)
  pre_args = (rows, jnp.asarray(pre, jnp.int32), jnp.full((groups,), prefix - 1, jnp.int32))
  own_args = (qs, jnp.asarray(suf, jnp.int32), jnp.full((ns,), suffix - 1, jnp.int32))
  alone = jax.jit(lambda a, kp, vp: paged_decode_attention_parts([a], kp, vp,
                                                                 out_dtype=jnp.float32)[0])
  t_prefix = time_ms(alone, (pre_args, kpool, vpool), repeats, inner=inner)
  t_own = time_ms(alone, (own_args, kpool, vpool), repeats, inner=inner)
  # Both parts in one launch (what shared_paged_attention runs), its partials unmerged: the
  # kernel alone, so that shared_prefix_ms - this is the time around it (gathering the group's
  # query rows, the merge); the prefix part's tiles of 32, 64 (the default) and 128 tokens.
  one_launch = {}
  for bs in (32, 64, 128):
    fn = jax.jit(lambda a, b, kp, vp, bs=bs: paged_decode_attention_parts(
        [a, b], kp, vp, block_tokens=[bs, default_block_tokens(e, 2, g)], merge_splits=False))
    one_launch[str(bs)] = time_ms(fn, (pre_args, own_args, kpool, vpool), repeats, inner=inner)
  kernel_alone = one_launch[str(default_block_tokens(e, 2, per_group * g))]
  o_ref = per_seq(*per_args)
  o_sh = shared(qs, kpool, vpool)
  shared_err = float(jnp.max(jnp.abs(o_ref[0].astype(jnp.float32) - o_sh[0].astype(
      jnp.float32))))
  return {"batch": b, "context": n, "kv_heads": k, "group": g, "head_dim": e,
          "page_size": page_size, "inner_calls": inner, "contiguous_kernel_ms": contiguous,
          "paged_kernel_ms": paged,
          "paged_over_contiguous_speed": contiguous / paged, "paged_max_abs_diff": err,
          "groups": groups, "per_group": per_group, "prefix": prefix, "suffix": suffix,
          "shared_prefix_ms": t_shared, "per_sequence_paged_ms": t_per,
          "shared_max_abs_diff": shared_err, "shared_prefix_part_ms": t_prefix,
          "shared_own_part_ms": t_own, "shared_one_launch_ms_by_prefix_tile": one_launch,
          "shared_kernel_alone_ms": kernel_alone,
          "shared_around_kernel_ms": t_shared - kernel_alone,
          "shared_prefix_speedup": t_per / t_shared}


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench paged",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--groups", type=int, default=64)
  ap.add_argument("--per-group", type=int, default=16)
  ap.add_argument("--prefix", type=int, default=2048)
  ap.add_argument("--suffix", type=int, default=256)
  ap.add_argument("--page-sizes", default="16,64")
  ap.add_argument("--out", default=None)
  ap.add_argument("--speed", action="store_true",
                  help="time the paged and shared-prefix attention instead (a GPU)")
  ap.add_argument("--quick", action="store_true", help="toy sizes for --speed (CPU)")
  args = ap.parse_args(argv)
  if args.speed:
    kw = (dict(batch=2, context=256, kv_heads=2, group=3, head_dim=16, groups=2, per_group=4,
               prefix=64, suffix=16, repeats=2) if args.quick else
          dict(batch=32, context=8192, kv_heads=4, group=3, head_dim=64, groups=args.groups,
               per_group=args.per_group, prefix=args.prefix, suffix=args.suffix, repeats=20))
    sizes = [16] if args.quick else [int(x) for x in args.page_sizes.split(",")]
    rows = [speed(page_size=ps, **kw) for ps in tqdm(sizes, desc="page sizes")]
    path = write_results("paged_speed" + ("_quick" if args.quick else ""), {"rows": rows},
                         args.out)
    print(f"\n{'page':>5} {'contig ms':>10} {'paged ms':>9} {'paged/contig':>13} "
          f"{'per-seq ms':>11} {'shared ms':>10} {'shared speed-up':>16}")
    for r in rows:
      print(f"{r['page_size']:5d} {r['contiguous_kernel_ms']:10.3f} {r['paged_kernel_ms']:9.3f} "
            f"{r['paged_over_contiguous_speed']:12.2f}x {r['per_sequence_paged_ms']:11.3f} "
            f"{r['shared_prefix_ms']:10.3f} {r['shared_prefix_speedup']:15.2f}x")
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path)}
  rows = [measure(args.groups, args.per_group, args.prefix, args.suffix, int(s))
          for s in args.page_sizes.split(",")]
  path = write_results("paged_memory", {"rows": rows}, args.out)
  print(f"\n{'page':>5} {'held':>8} {'optimum':>8} {'over':>7} {'unshared':>9} {'saving':>7}")
  for r in rows:
    print(f"{r['page_size']:5d} {r['pages_held']:8d} {r['tree_optimum_pages']:8d} "
          f"{100 * r['over_optimum']:6.2f}% {r['pages_without_sharing']:9d} "
          f"{r['saving_vs_unshared']:6.2f}x")
  print(f"wrote {path}")
  return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
  main()
