"""Paged decoding: the model's cache seam over the page pool, prefix sharing through the tree.

Axes: B sequences, T new tokens, P pages, S page size, W page-table width, K KV heads, E head
dim, H query heads.

`PagedLayerCache` has the two methods the model calls (`update`, `attend`), so the decoder runs
unchanged on pages: token t of sequence b lives in page tables[b, t // S] at offset t % S, its
position is its logical index, and attention reads a sequence's pages through its table (here by
gathering them into the slot layout kvcache.cache attends; a paged kernel that reads pages in
place is the GPU path still to come). `generate_shared` takes many prompts, reuses every stored
prefix (radix tree) so shared prompt pages are held and prefilled once, and decodes all
sequences together in jit steps over bucketed shapes (batch and page-table width rounded up).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvcache.cache import HeadGroup, LayerCache
from kvcache.pool import PagedKV, PagePool, copy_pages, init_paged_kv
from kvcache.radix import RadixTree
from kvcache.sampling import SamplingConfig, sample


@dataclasses.dataclass
class PagedLayerCache:
  """One layer's pages seen through the batch's page tables.

  Attributes:
    k, v: [K, P, S, E] the layer's pages.
    tables: int32 [B, W] page of each logical block (entries past a sequence's pages unused).
    group_size: G query heads per KV head (static); decode_attn: the seam's name (static).
  """

  k: jax.Array
  v: jax.Array
  tables: jax.Array
  group_size: int = 1
  decode_attn: str = "auto"

  def update(self, k_new, v_new, positions, valid=None) -> PagedLayerCache:
    """Writes tokens at their positions: k_new, v_new [B, T, k, E] (first k KV heads);
    positions, valid [B, T]."""
    s = self.k.shape[2]
    page = jnp.take_along_axis(self.tables, positions // s, axis=1)  # [B, T]
    if valid is not None:
      page = jnp.where(valid, page, self.k.shape[1])  # past the pool: dropped
    idx = (jnp.arange(k_new.shape[2])[None, None, :], page[:, :, None], (positions % s)[:, :, None])
    return dataclasses.replace(
        self, k=self.k.at[idx].set(k_new.astype(self.k.dtype), mode="drop"),
        v=self.v.at[idx].set(v_new.astype(self.v.dtype), mode="drop"))

  def attend(self, q, positions, **kw):
    """Decode on GPU (or with decode_attn='pallas'): the paged kernel reads each sequence's
    pages in place. Otherwise LayerCache.attend over the gathered pages (slot n of sequence b
    holds position n): prefill, the jnp reference, probabilities, token masks."""
    b, w = self.tables.shape
    kh, p, s, e = self.k.shape
    t, h = q.shape[1], q.shape[2]
    plain = not (kw.get("token_mask") or kw.get("fresh") or kw.get("return_probs"))
    kernel = self.decode_attn == "pallas" or (self.decode_attn == "auto"
                                              and jax.default_backend() == "gpu")
    if t == 1 and plain and kernel and s >= 16 and e >= 16 and not e & (e - 1) and \
        h == kh * self.group_size:
      from pallas_kernels.decode import paged_decode_attention
      qg = q[:, 0].reshape(b, kh, self.group_size, e)
      o, _ = paged_decode_attention(qg, self.k, self.v, self.tables, positions[:, 0])
      return o.reshape(b, 1, h, e), None
    view = lambda x: x[:, self.tables].transpose(1, 0, 2, 3, 4).reshape(b, kh, w * s, e)
    pos = jnp.broadcast_to(jnp.arange(w * s, dtype=jnp.int32), (b, kh, w * s))
    # 'pallas' here meant the paged kernel; the gathered view takes whatever applies.
    flat = LayerCache((HeadGroup(view(self.k), view(self.v), pos),), self.group_size,
                      "auto" if self.decode_attn == "pallas" else self.decode_attn)
    return flat.attend(q, positions, **kw)


jax.tree_util.register_dataclass(PagedLayerCache, data_fields=["k", "v", "tables"],
                                 meta_fields=["group_size", "decode_attn"])


def _layers(kv: PagedKV, tables, group_size, decode_attn):
  return tuple(PagedLayerCache(k, v, tables, group_size, decode_attn) for k, v in zip(kv.k, kv.v))


@functools.partial(jax.jit, static_argnames=("graphdef", "decode_attn"), donate_argnames=("kv",))
def paged_prefill(graphdef, params, kv: PagedKV, tokens, start, lengths, tables,
                  decode_attn: str = "auto"):
  """Prefills tokens [B, T] at positions start[b] + t (t < lengths[b]) into the sequences'
  pages (their tables [B, W]; pages allocated by the pool). Returns the logits of each
  sequence's last token [B, V] and the pages."""
  model = nnx.merge(graphdef, params)
  t = tokens.shape[1]
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  valid = jnp.arange(t)[None] < lengths[:, None]
  layers = _layers(kv, tables, model.cfg.n_heads // model.cfg.n_kv_heads, decode_attn)
  logits, layers, _ = model.forward_cached(tokens, positions, layers, valid=valid)
  last = logits[jnp.arange(tokens.shape[0]), jnp.maximum(lengths - 1, 0)]
  return last, PagedKV(tuple(x.k for x in layers), tuple(x.v for x in layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "decode_attn"), donate_argnames=("kv",))
def paged_decode_step(graphdef, params, kv: PagedKV, token, positions, tables,
                      decode_attn: str = "auto"):
  """One token per sequence at positions [B] (rows past the live batch: position -1, not
  written). Returns logits [B, V] and the pages."""
  model = nnx.merge(graphdef, params)
  layers = _layers(kv, tables, model.cfg.n_heads // model.cfg.n_kv_heads, decode_attn)
  pos = jnp.maximum(positions, 0)[:, None]
  logits, layers, _ = model.forward_cached(token[:, None], pos, layers, valid=(positions >= 0)[
      :, None])
  return logits[:, 0], PagedKV(tuple(x.k for x in layers), tuple(x.v for x in layers))


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass
class SharedStats:
  """What generate_shared held: pages of the pool at the end of prefill and at the peak,
  tokens prefilled (after prefix reuse) and tokens the prompts have in all."""

  prefill_pages: int
  peak_pages: int
  prefilled_tokens: int
  prompt_tokens: int


def generate_shared(model: nnx.Module, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 32, page_size: int = 16, num_pages: int | None = None,
                    sampling: SamplingConfig | None = None, seed: int = 0,
                    decode_attn: str = "auto", pad_to: int = 16
                    ) -> tuple[list[list[int]], SharedStats]:
  """Generates for many prompts that share prefixes, each shared prefix stored once.

  Prompts are admitted in order: each reuses the longest prefix the tree holds (all but its
  last token at most, which is prefilled for its logits), prefills the rest onto its own pages
  and is inserted into the tree; then every sequence decodes together, one jit step per token
  over bucketed shapes. Greedy tokens equal decoding each prompt alone.

  Returns the new tokens per prompt and SharedStats.
  """
  sampling = sampling or SamplingConfig()
  cfg = model.cfg
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate_shared needs prompts of >= 1 token")
  total = sum(len(p) for p in prompts)
  # Rounded up to a power of two, like the batch and the table width: few shapes compile.
  num_pages = num_pages or _bucket(sum(-(-(len(p) + max_new_tokens) // page_size)
                                       for p in prompts) + 1)
  pool = PagePool(num_pages, page_size)
  tree = RadixTree(pool)
  kv = init_paged_kv(cfg, num_pages, page_size)
  graphdef, params = nnx.split(model)
  key = jax.random.key(seed)
  firsts, prefilled = [], 0
  for i, prompt in enumerate(prompts):
    m, pages = tree.match(prompt[:-1])
    copies = pool.add(i, pages, m)
    copies += pool.extend(i, len(prompt) - m + max_new_tokens)
    if copies:
      kv = copy_pages(kv, jnp.asarray([c[0] for c in copies]), jnp.asarray([c[1] for c in copies]))
    rest = list(prompt[m:])
    t = -(-len(rest) // pad_to) * pad_to
    toks = np.zeros((1, t), np.int32)
    toks[0, :len(rest)] = rest
    tables, _ = pool.page_tables([i])
    logits, kv = paged_prefill(graphdef, params, kv, jnp.asarray(toks), jnp.asarray([m]),
                               jnp.asarray([len(rest)]), jnp.asarray(tables), decode_attn)
    key, sub = jax.random.split(key)
    firsts.append(int(sample(logits, sub, sampling)[0]))
    prefilled += len(rest)
    tree.insert(prompt, pool.table(i))
  prefill_pages = pool.pages_in_use
  b = len(prompts)
  bb = _bucket(b)
  tables, lengths = pool.page_tables(list(range(b)))
  tables = np.pad(tables, ((0, bb - b), (0, 0)))
  out = [[f] for f in firsts]
  tok = np.zeros(bb, np.int32)
  tok[:b] = firsts
  pos = np.full(bb, -1, np.int32)
  pos[:b] = [len(p) for p in prompts]
  for _ in range(max_new_tokens - 1):
    logits, kv = paged_decode_step(graphdef, params, kv, jnp.asarray(tok), jnp.asarray(pos),
                                   jnp.asarray(tables), decode_attn)
    key, sub = jax.random.split(key)
    nxt = np.asarray(sample(logits, sub, sampling))
    for i in range(b):
      out[i].append(int(nxt[i]))
    tok[:b] = nxt[:b]
    pos[:b] += 1
  stats = SharedStats(prefill_pages, pool.peak_pages, prefilled, total)
  for i in range(b):
    pool.release(i)
  return out, stats
