"""Paged KV memory under prefix sharing: pages the pool actually holds against the tree optimum.

    python -m experiments bench paged                 # 64 groups x 16 prompts, 2,048-token prefix

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

import numpy as np
from tqdm import tqdm

from experiments.results import write_results
from kvcache.pool import PagePool
from kvcache.radix import RadixTree


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


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments bench paged",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--groups", type=int, default=64)
  ap.add_argument("--per-group", type=int, default=16)
  ap.add_argument("--prefix", type=int, default=2048)
  ap.add_argument("--suffix", type=int, default=256)
  ap.add_argument("--page-sizes", default="16,64")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
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
