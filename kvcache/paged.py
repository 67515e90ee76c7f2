"""Paged decoding: the model's cache seam over the page pool, prefix sharing through the tree.

Axes: B sequences, T new tokens, P pages, S page size, W page-table width, K KV heads, E head
dim, H query heads.

`PagedLayerCache` has the two methods the model calls (`update`, `attend`), so the decoder runs
unchanged on pages: token t of sequence b lives in page tables[b, t // S] at offset t % S, its
position is its logical index, and attention reads a sequence's pages through its table (here by
gathering them into the slot layout kvcache.cache attends; on GPU, decode goes through the Pallas
paged kernel, which reads pages in place). `generate_shared` takes many prompts, reuses every stored
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

from kvcache.attention import cache_attention
from kvcache.cache import HeadGroup, LayerCache
from kvcache.decode import compute_weights
from kvcache.host import to_device
from kvcache.pool import PagedKV, PagePool, apply_copies, init_paged_kv
from kvcache.radix import RadixTree
from kvcache.sampling import SamplingConfig, sample
from pallas_kernels.merge import merge_attention, merge_partials


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixGroups:
  """Rows of a batch grouped by a shared, page-aligned prefix (Hydragen / BatchLLM).

  Group r's rows all begin with the same length[r] tokens held in the pages tables[r]; the
  prefix part of their attention is computed once for all of the group's query rows and merged
  with each row's own part (the pages after the prefix) by log-sum-exp.

  Attributes:
    members: int32 [Gr, M] batch rows of each group (padding: a row index >= B).
    tables: int32 [Gr, Wp] the group's prefix pages.
    length: int32 [Gr] prefix tokens, a multiple of the page size (0: a padding group).
    shift: int32 [B] prefix tokens of each row's group (0: a row in no group).
    slot: int32 [B] where each row is in members, flattened (group * M + j; -1: in no group).
  """

  members: jax.Array
  tables: jax.Array
  length: jax.Array
  shift: jax.Array
  slot: jax.Array


def prefix_groups(groups: Sequence[tuple[Sequence[int], Sequence[int]]], batch: int,
                  page_size: int) -> PrefixGroups | None:
  """PrefixGroups of (rows, prefix pages) pairs for a batch of `batch` rows (already a bucket);
  groups, members and prefix pages are padded to powers of two so few shapes compile. Groups of
  fewer than two rows or no pages share nothing and are left out; None when none is left."""
  groups = [(list(r), list(p)) for r, p in groups if len(r) > 1 and len(p) > 0]
  if not groups:
    return None
  rows = [r for r, _ in groups]
  if len({i for r in rows for i in r}) != sum(map(len, rows)) or max(max(r) for r in rows) >= batch:
    raise ValueError(f"prefix groups must hold distinct rows below {batch}, got {rows}")
  gr, m = bucket(len(groups)), bucket(max(map(len, rows)))
  wp = bucket(max(len(p) for _, p in groups))
  members = np.full((gr, m), np.iinfo(np.int32).max, np.int32)
  tables = np.zeros((gr, wp), np.int32)
  length = np.zeros(gr, np.int32)
  shift = np.zeros(batch, np.int32)
  slot = np.full(batch, -1, np.int32)
  for j, (r, p) in enumerate(groups):
    members[j, :len(r)] = r
    tables[j, :len(p)] = p
    length[j] = len(p) * page_size
    shift[r] = len(p) * page_size
    slot[r] = j * m + np.arange(len(r))
  return PrefixGroups(*map(jnp.asarray, (members, tables, length, shift, slot)))


def _member_rows(x: jax.Array, mm: int, g: int) -> jax.Array:
  """The prefix part's partials [Gr, K, P, M * G, ...] (group r's rows, member by member) ->
  [Gr * M, K, P, G, ...] each member's G rows."""
  gr, kh, p, _, *rest = x.shape
  return jnp.moveaxis(x.reshape(gr, kh, p, mm, g, *rest), 3, 1).reshape(gr * mm, kh, p, g, *rest)


def _page_view(k_pages: jax.Array, tables: jax.Array) -> jax.Array:
  """[K, P, S, E] pages read through tables [R, W] -> [R, K, W * S, E] (logical slot order)."""
  r, w = tables.shape
  kh, _, s, e = k_pages.shape
  return k_pages[:, tables].transpose(1, 0, 2, 3, 4).reshape(r, kh, w * s, e)


def shared_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           tables: jax.Array, positions: jax.Array, groups: PrefixGroups, *,
                           kernel: bool = False,
                           prefix_splits: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of T new queries per row over its pages, each group's prefix attended once.

  Args:
    q: [B, T, K, G, E] queries (after RoPE) grouped by KV head.
    k_pages, v_pages: [K, P, S, E] the pool; tables: int32 [B, W] each row's pages (its group's
      prefix pages first); positions: int32 [B, T] the queries' positions (causal: a query sees
      tokens at or before its position).
    groups: the rows' prefix groups.
    kernel: with T == 1, both parts in one launch of pallas_kernels' paged decode kernel
      (paged_decode_attention_parts), pages read in place: the prefix part with a group's
      M * G query rows as the kernel's rows (row tiles over each prefix page read once), the
      own part one row per sequence. Else gathered
      pages and kvcache.attention.cache_attention (the prefill kernel on GPU). The two parts
      are merged by log-sum-exp.
    prefix_splits: with the kernel, the prefix pages cut into this many splits (default: the
      kernel's, none when the two parts' programs fill the GPU; on an H200 more splits did not
      run faster). Every row's prefix splits and own part are merged in one pass.
  Returns:
    (out [B, T, K, G, E] in q's dtype, lse [B, T, K, G] float32): equal to attention over each
    row's whole table.
  """
  b, t, kh, g, e = q.shape
  s, w = k_pages.shape[2], tables.shape[1]
  gr, mm = groups.members.shape
  decode = kernel and t == 1
  dtype = q.dtype
  if not decode:
    q = q.astype(jnp.float32)  # float32 queries: float32 partials, rounded once
  # The prefix part: the M * T * G query rows of a group against its prefix, once.
  rows = q[jnp.minimum(groups.members, b - 1)]  # [Gr, M, T, K, G, E]
  rows = rows.transpose(0, 3, 1, 2, 4, 5).reshape(gr, kh, mm * t * g, e)
  # The own part: each row's pages after its prefix, positions shifted alike.
  first = groups.shift // s
  own = jnp.take_along_axis(tables, jnp.minimum(first[:, None] + jnp.arange(w)[None], w - 1), 1)
  rel = positions - groups.shift[:, None]
  idx = jnp.maximum(groups.slot, 0)
  grouped = (groups.slot >= 0)[:, None, None, None]
  if decode:  # both parts in one launch of the paged kernel, its float32 split partials
    from pallas_kernels.decode import paged_decode_attention_parts
    (o_p, lse_p), (o_s, lse_s) = paged_decode_attention_parts(
        [(rows, groups.tables, groups.length - 1), (q[:, 0], own, rel[:, 0])], k_pages,
        v_pages, num_splits=None if prefix_splits is None else [prefix_splits, 1],
        merge_splits=False)
    o_p, lse_p = (_member_rows(x, mm, g)[idx] for x in (o_p, lse_p))
    lse_p = jnp.where(grouped, lse_p, -jnp.inf)
    out, lse = merge_partials(jnp.concatenate([o_p, o_s], 2), jnp.concatenate([lse_p, lse_s], 2),
                              axis=2)  # [B, K, G, E]: prefix splits and own part at once
    return out[:, None].astype(dtype), lse[:, None]
  n_p = groups.tables.shape[1] * s
  ppos = jnp.arange(n_p, dtype=jnp.int32)
  ppos = jnp.where(ppos[None] < groups.length[:, None], ppos[None], -1)
  o_p, lse_p = cache_attention(rows[:, :, None], _page_view(k_pages, groups.tables),
                               _page_view(v_pages, groups.tables),
                               jnp.broadcast_to(ppos[:, None], (gr, kh, n_p)),
                               jnp.broadcast_to(groups.length[:, None], (gr, mm * t * g)))
  o_p, lse_p = o_p[:, :, 0], lse_p[:, :, 0]
  pos = jnp.broadcast_to(jnp.arange(w * s, dtype=jnp.int32), (b, kh, w * s))
  o_s, lse_s = cache_attention(q.transpose(0, 2, 3, 1, 4), _page_view(k_pages, own),
                               _page_view(v_pages, own), pos, rel)
  o_s, lse_s = o_s.transpose(0, 3, 1, 2, 4), lse_s.transpose(0, 3, 1, 2)
  # Back to the rows: row b's prefix part is its group's row slot[b] (none: lse -inf).
  o_p = o_p.reshape(gr, kh, mm, t, g, e).transpose(0, 2, 3, 1, 4, 5).reshape(gr * mm, t, kh, g, e)
  lse_p = lse_p.reshape(gr, kh, mm, t, g).transpose(0, 2, 3, 1, 4).reshape(gr * mm, t, kh, g)
  out_p = o_p[idx]
  lse_pb = jnp.where(grouped, lse_p[idx], -jnp.inf)
  out, lse = merge_attention(out_p, lse_pb, o_s, lse_s)
  return out.astype(dtype), lse


@dataclasses.dataclass
class PagedLayerCache:
  """One layer's pages seen through the batch's page tables.

  Attributes:
    k, v: [K, P, S, E] the layer's pages.
    tables: int32 [B, W] page of each logical block (entries past a sequence's pages unused).
    prefix: the rows' shared-prefix groups, or None (each row attends its own table).
    group_size: G query heads per KV head (static); decode_attn: the seam's name (static).
  """

  k: jax.Array
  v: jax.Array
  tables: jax.Array
  prefix: PrefixGroups | None = None
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
    pages in place. With prefix groups: shared_paged_attention (each group's prefix once).
    Otherwise LayerCache.attend over the gathered pages (slot n of sequence b holds position
    n): prefill, the jnp reference, probabilities, token masks."""
    b, w = self.tables.shape
    kh, p, s, e = self.k.shape
    t, h = q.shape[1], q.shape[2]
    plain = not (kw.get("token_mask") or kw.get("fresh") or kw.get("return_probs")
                 or kw.get("score_window"))
    kernel = self.decode_attn == "pallas" or (self.decode_attn == "auto"
                                              and jax.default_backend() == "gpu")
    kernel = kernel and s >= 16 and e >= 16 and not e & (e - 1)
    if plain and h == kh * self.group_size:
      qg = q.reshape(b, t, kh, self.group_size, e)
      if self.prefix is not None:
        o, _ = shared_paged_attention(qg, self.k, self.v, self.tables, positions, self.prefix,
                                      kernel=kernel)
        return o.reshape(b, t, h, e), None
      if t == 1 and kernel:
        from pallas_kernels.decode import paged_decode_attention
        o, _ = paged_decode_attention(qg[:, 0], self.k, self.v, self.tables, positions[:, 0])
        return o.reshape(b, 1, h, e), None
    pos = jnp.broadcast_to(jnp.arange(w * s, dtype=jnp.int32), (b, kh, w * s))
    # 'pallas' here meant the paged kernel; the gathered view takes whatever applies.
    flat = LayerCache((HeadGroup(_page_view(self.k, self.tables),
                                 _page_view(self.v, self.tables), pos),), self.group_size,
                      "auto" if self.decode_attn == "pallas" else self.decode_attn)
    return flat.attend(q, positions, **kw)


jax.tree_util.register_dataclass(PagedLayerCache, data_fields=["k", "v", "tables", "prefix"],
                                 meta_fields=["group_size", "decode_attn"])


def _layers(kv: PagedKV, tables, prefix, group_size, decode_attn):
  return tuple(PagedLayerCache(k, v, tables, prefix, group_size, decode_attn)
               for k, v in zip(kv.k, kv.v))


@functools.partial(jax.jit, static_argnames=("graphdef", "decode_attn"), donate_argnames=("kv",))
def paged_prefill(graphdef, params, kv: PagedKV, tokens, start, lengths, tables,
                  prefix: PrefixGroups | None = None, decode_attn: str = "auto"):
  """Prefills tokens [B, T] at positions start[b] + t (t < lengths[b]) into the sequences'
  pages (their tables [B, W]; pages allocated by the pool); with prefix groups, each group's
  shared prefix is attended once for all its rows' suffix queries. Returns the logits of each
  sequence's last token [B, V] and the pages."""
  model = nnx.merge(graphdef, params)
  t = tokens.shape[1]
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  valid = jnp.arange(t)[None] < lengths[:, None]
  layers = _layers(kv, tables, prefix, model.cfg.n_heads // model.cfg.n_kv_heads, decode_attn)
  logits, layers, _ = model.forward_cached(tokens, positions, layers, valid=valid)
  last = logits[jnp.arange(tokens.shape[0]), jnp.maximum(lengths - 1, 0)]
  return last, PagedKV(tuple(x.k for x in layers), tuple(x.v for x in layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "decode_attn"), donate_argnames=("kv",))
def paged_decode_step(graphdef, params, kv: PagedKV, token, positions, tables,
                      prefix: PrefixGroups | None = None, decode_attn: str = "auto"):
  """One token per sequence at positions [B] (rows past the live batch: position -1, not
  written); with prefix groups, shared-prefix attention. Returns logits [B, V] and the pages."""
  model = nnx.merge(graphdef, params)
  layers = _layers(kv, tables, prefix, model.cfg.n_heads // model.cfg.n_kv_heads, decode_attn)
  pos = jnp.maximum(positions, 0)[:, None]
  logits, layers, _ = model.forward_cached(token[:, None], pos, layers, valid=(positions >= 0)[
      :, None])
  return logits[:, 0], PagedKV(tuple(x.k for x in layers), tuple(x.v for x in layers))


def bucket(n: int) -> int:
  """n rounded up to a power of two (batch rows, widths): the shapes jit steps compile for."""
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
                    decode_attn: str = "auto", pad_to: int = 16, shared_attention: bool = True
                    ) -> tuple[list[list[int]], SharedStats]:
  """Generates for many prompts that share prefixes, each shared prefix stored and attended once.

  The prompts are grouped by shared prefix first (kvcache.batchllm.group_prompts: one level of
  groups, the prefill tokens of the whole batch minimised). Per group, the prefix is prefilled
  once through the radix tree (a part another group stored is reused), then all members'
  remaining tokens in one batched prefill; with shared_attention, the group's prefix pages are
  attended once for all its members' queries (shared_paged_attention), in that prefill and in
  every decode step. Then all sequences decode together, one jit step per token over bucketed
  shapes. Greedy tokens equal decoding each prompt alone.

  Returns the new tokens per prompt (in order) and SharedStats.
  """
  from kvcache.batchllm import group_prompts
  sampling = sampling or SamplingConfig()
  cfg = model.cfg
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate_shared needs prompts of >= 1 token")
  prompts = [list(p) for p in prompts]
  total = sum(len(p) for p in prompts)
  # Rounded up to a power of two, like the batch and the table width: few shapes compile.
  num_pages = num_pages or bucket(sum(-(-(len(p) + max_new_tokens) // page_size)
                                       for p in prompts) + len(prompts) + 1)
  pool = PagePool(num_pages, page_size)
  tree = RadixTree(pool)
  kv = init_paged_kv(cfg, num_pages, page_size)
  graphdef, params = nnx.split(model)
  params = compute_weights(graphdef, params)  # cast once, not every step
  key = jax.random.key(seed)
  firsts, prefilled, shared = [0] * len(prompts), 0, []

  def admit(seq, tokens, room):
    """A sequence for `tokens`: the tree's longest stored prefix (all but the last token at
    most) reused, pages for the rest and `room` more. Returns (reused tokens, kv)."""
    m, pages = tree.match(tokens[:-1])
    return m, apply_copies(kv, pool.add(seq, pages, m) + pool.extend(seq, len(tokens) - m + room))

  def run_prefill(seqs, rests, starts, prefix):
    bb = bucket(len(seqs))
    t = -(-max(map(len, rests)) // pad_to) * pad_to
    toks = np.zeros((bb, t), np.int32)
    for j, r in enumerate(rests):
      toks[j, :len(r)] = r
    tables, _ = pool.page_tables(seqs, rows=bb)
    return paged_prefill(graphdef, params, kv, jnp.asarray(toks),
                         jnp.asarray(np.pad(starts, (0, bb - len(seqs)))),
                         jnp.asarray(np.pad([len(r) for r in rests], (0, bb - len(seqs)))),
                         jnp.asarray(tables), prefix, decode_attn)

  for gi, group in enumerate(group_prompts(prompts)):
    stem, rows = list(group.prefix), list(group.members)
    if stem:  # the group's prefix, prefilled once (its logits are not needed)
      m, kv = admit(("prefix", gi), stem, 0)
      if m < len(stem):
        _, kv = run_prefill([("prefix", gi)], [stem[m:]], [m], None)
        prefilled += len(stem) - m
      tree.insert(stem, pool.table(("prefix", gi)))
    starts = []
    for i in rows:
      m, kv = admit(i, prompts[i], max_new_tokens)
      starts.append(m)
    # The full pages every member holds of the stem: what their attention shares.
    common = pool.table(("prefix", gi))[:len(stem) // page_size] if stem else []
    for i in rows:
      n = 0
      while n < len(common) and pool.table(i)[n] == common[n]:
        n += 1
      common = common[:n]
    if stem:
      pool.release(("prefix", gi))  # the tree holds its pages now
    share = [(list(range(len(rows))), common)] if shared_attention else []
    logits, kv = run_prefill(rows, [prompts[i][m:] for i, m in zip(rows, starts)], starts,
                             prefix_groups(share, bucket(len(rows)), page_size))
    key, sub = jax.random.split(key)
    nxt = np.asarray(sample(logits, sub, sampling))
    for j, (i, m) in enumerate(zip(rows, starts)):
      firsts[i] = int(nxt[j])
      prefilled += len(prompts[i]) - m
      tree.insert(prompts[i], pool.table(i))
    shared.append((rows, common))
  prefill_pages = pool.pages_in_use
  b = len(prompts)
  bb = bucket(b)
  tables, _ = pool.page_tables(list(range(b)), rows=bb)
  prefix = prefix_groups(shared, bb, page_size) if shared_attention else None
  out = [[f] for f in firsts]
  tok = np.zeros(bb, np.int32)
  tok[:b] = firsts
  pos = np.full(bb, -1, np.int32)
  pos[:b] = [len(p) for p in prompts]
  for _ in range(max_new_tokens - 1):
    # tok and pos are rewritten below (safe today only because nxt is read first): private copies.
    logits, kv = paged_decode_step(graphdef, params, kv, to_device(tok), to_device(pos),
                                   jnp.asarray(tables), prefix, decode_attn)
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
