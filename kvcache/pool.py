"""A paged KV pool: K/V pages on device, their bookkeeping on the host.

Axes: L layers, P pages in the pool, S page size (tokens, a power of two), K KV heads, E head
dim, W page-table width.

The device arrays (`PagedKV`: per layer K and V [K, P, S, E]) pass through jit steps donated;
which page holds what is host-side bookkeeping (`PagePool`): a free list, a reference count per
page, and a page table per sequence (its pages in logical order, so logical block i of a
sequence is physical page table[i] and token t sits at (table[t // S], t % S)). A page is freed
when no sequence and no prefix-tree node holds it. `fork` shares the parent's full pages and
copies only its last partial page (copy-on-write); `extend` allocates pages for new tokens, and
copies a shared partial last page before it is written. Every call either succeeds or leaves the
pool as it was (a rejected call changes nothing).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from colm.config import ModelConfig, resolve_dtype


class OutOfPages(RuntimeError):
  """The pool has fewer free pages than a call needs (nothing was allocated)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKV:
  """Device pages of every layer. k, v: per layer [K, P, S, E] (keys after RoPE; per KV head the
  pages are contiguous, so a kernel reads page p of head k at rows p * S .. p * S + S - 1)."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @property
  def page_size(self) -> int:
    return self.k[0].shape[2]

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[1]

  def nbytes(self) -> int:
    return sum(x.nbytes for x in self.k + self.v)


def init_paged_kv(cfg: ModelConfig, num_pages: int, page_size: int = 16,
                  dtype: str | None = None) -> PagedKV:
  """Zeroed pages: per layer K and V [n_kv_heads, num_pages, page_size, head_dim]."""
  dt = resolve_dtype(dtype or cfg.dtype)
  shape = (cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
  return PagedKV(tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
                 tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)))


@functools.partial(jax.jit, donate_argnames=("kv",))
def copy_pages(kv: PagedKV, src: jax.Array, dst: jax.Array) -> PagedKV:
  """Copies pages src [n] to dst [n] in every layer (the copy-on-write of fork / extend)."""
  return PagedKV(tuple(k.at[:, dst].set(k[:, src]) for k in kv.k),
                 tuple(v.at[:, dst].set(v[:, src]) for v in kv.v))


def apply_copies(kv: PagedKV, copies: list[tuple[int, int]]) -> PagedKV:
  """kv with the pool's copy-on-write copies [(src, dst)] run (copy_pages); kv itself if none."""
  if not copies:
    return kv
  return copy_pages(kv, jnp.asarray([c[0] for c in copies], jnp.int32),
                    jnp.asarray([c[1] for c in copies], jnp.int32))


class PagePool:
  """Host-side bookkeeping of a pool of `num_pages` pages of `page_size` tokens.

  Sequences are named by any hashable id. Queries: `pages_in_use`, `peak_pages`,
  `table(seq)`, `length(seq)`, `refcount(page)`.
  """

  def __init__(self, num_pages: int, page_size: int = 16):
    if num_pages < 1:
      raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    if page_size < 1 or page_size & (page_size - 1):
      raise ValueError(f"page_size must be a power of two, got {page_size}")
    self.num_pages, self.page_size = int(num_pages), int(page_size)
    self._ref = np.zeros(num_pages, np.int32)
    self._free = collections.deque(range(num_pages))
    self._tables: dict[object, list[int]] = {}
    self._lengths: dict[object, int] = {}
    self.peak_pages = 0

  # Queries ----------------------------------------------------------------------------------------

  @property
  def pages_in_use(self) -> int:
    return self.num_pages - len(self._free)

  @property
  def free_pages(self) -> int:
    return len(self._free)

  def refcount(self, page: int) -> int:
    return int(self._ref[page])

  def sequences(self) -> list:
    return list(self._tables)

  def __contains__(self, seq) -> bool:
    return seq in self._tables

  def table(self, seq) -> list[int]:
    return list(self._tables[self._known(seq)])

  def length(self, seq) -> int:
    return self._lengths[self._known(seq)]

  def _known(self, seq):
    if seq not in self._tables:
      raise KeyError(f"unknown sequence {seq!r}")
    return seq

  def _pages_for(self, tokens: int) -> int:
    return -(-tokens // self.page_size)

  # Page references --------------------------------------------------------------------------------

  def _alloc(self, n: int) -> list[int]:
    if n > len(self._free):
      raise OutOfPages(f"need {n} pages, {len(self._free)} of {self.num_pages} free")
    pages = [self._free.popleft() for _ in range(n)]
    self._ref[pages] = 1
    self.peak_pages = max(self.peak_pages, self.pages_in_use)
    return pages

  def retain(self, pages) -> None:
    """Another holder (a prefix-tree node, a new sequence) takes a reference to pages."""
    pages = list(pages)
    if any(self._ref[p] <= 0 for p in pages):
      raise ValueError(f"retain of a free page among {pages}")
    for p in pages:
      self._ref[p] += 1

  def drop(self, pages) -> None:
    """A holder lets go of pages; a page with no holder left goes back to the free list."""
    pages = list(pages)
    counts = collections.Counter(pages)
    if any(self._ref[p] < c for p, c in counts.items()):
      raise ValueError(f"drop of a page that is not held among {pages}")
    for p in pages:
      self._ref[p] -= 1
      if self._ref[p] == 0:
        self._free.append(p)

  # Sequences --------------------------------------------------------------------------------------

  def add(self, seq, shared_pages=(), shared_tokens: int = 0) -> list[tuple[int, int]]:
    """A new sequence starting with shared_tokens tokens held by shared_pages (a prefix match:
    full pages, and possibly a last partial page, which is copied so that the new sequence may
    write after it). Returns the copies [(src, dst)] to run on device (copy_pages)."""
    if seq in self._tables:
      raise ValueError(f"sequence {seq!r} exists already")
    shared_pages = list(shared_pages)
    if len(shared_pages) != self._pages_for(shared_tokens):
      raise ValueError(f"{shared_tokens} tokens need {self._pages_for(shared_tokens)} pages, "
                       f"got {len(shared_pages)}")
    if any(self._ref[p] <= 0 for p in shared_pages):
      raise ValueError(f"shared pages {shared_pages} include a free page")
    partial = shared_tokens % self.page_size != 0
    full = shared_pages[:-1] if partial else shared_pages
    copies = []
    if partial:
      (dst,) = self._alloc(1)  # the only call that can fail, before anything changed
      copies.append((shared_pages[-1], dst))
    self.retain(full)
    self._tables[seq] = full + [c[1] for c in copies]
    self._lengths[seq] = shared_tokens
    return copies

  def fork(self, parent, child) -> list[tuple[int, int]]:
    """child continues from parent's tokens: shares its full pages, copies its partial last
    page. Returns the copies to run on device."""
    self._known(parent)
    return self.add(child, self._tables[parent], self._lengths[parent])

  def extend(self, seq, n_tokens: int) -> list[tuple[int, int]]:
    """Room for n_tokens more tokens of seq (new pages as needed; a shared partial last page is
    copied first). Returns the copies to run on device before writing."""
    self._known(seq)
    if n_tokens < 0:
      raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    table, length = self._tables[seq], self._lengths[seq]
    cow = length % self.page_size != 0 and self._ref[table[-1]] > 1
    need = self._pages_for(length + n_tokens) - len(table) + int(cow)
    pages = self._alloc(need)  # raises before anything changed
    copies = []
    if cow:
      copies.append((table[-1], pages[0]))
      self.drop([table[-1]])
      table[-1] = pages.pop(0)
    table.extend(pages)
    self._lengths[seq] = length + n_tokens
    return copies

  def release(self, seq) -> None:
    """Ends a sequence: its pages lose one holder each."""
    self._known(seq)
    self.drop(self._tables.pop(seq))
    del self._lengths[seq]

  def slots(self, seq, start: int, n: int) -> np.ndarray:
    """int [n, 2] (page, offset) of tokens start .. start + n - 1 of seq."""
    table = self._tables[self._known(seq)]
    t = np.arange(start, start + n)
    return np.stack([np.asarray(table, np.int64)[t // self.page_size], t % self.page_size], -1)

  def page_tables(self, seqs, width: int | None = None, rows: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(tables int32 [R, W] padded with 0, lengths int32 [R]) for a jit step; W defaults to the
    longest table rounded up to a power of two (a bucket), R to len(seqs) (rows past the
    sequences: page 0, length 0, as bucketed batches pad)."""
    tabs = [self._tables[self._known(s)] for s in seqs]
    longest = max([len(t) for t in tabs] + [1])
    w = width or 1 << (longest - 1).bit_length()
    if w < longest:
      raise ValueError(f"page-table width {w} is below the longest table ({longest} pages)")
    r = len(tabs) if rows is None else rows
    if r < len(tabs):
      raise ValueError(f"rows {r} is below the number of sequences ({len(tabs)})")
    out = np.zeros((r, w), np.int32)
    lengths = np.zeros(r, np.int32)
    for i, (s, t) in enumerate(zip(seqs, tabs)):
      out[i, :len(t)] = t
      lengths[i] = self._lengths[s]
    return out, lengths
