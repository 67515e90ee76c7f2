"""An offline batch engine over the paged pool: chunked prefill mixed with decode, schedulers
behind one interface.

Axes: B rows of a step, C prefill chunk tokens, W page-table width, S page size.

`Engine.run(requests, scheduler)` serves a list of requests (kvcache.batchllm.Request, or token
lists) to the end and returns one `Output` per request in submission order. Each step spends a
token budget: one token for every sequence that is decoding, the rest on prefill chunks of at
most C tokens (paged_prefill for the chunks, paged_decode_step for the decoding rows; every
shape bucketed, so a changing set of sequences reuses a few compiled steps). Pages are reserved
when a request is admitted (its prompt past the reused prefix, plus max_new_tokens), so a
running request never runs out; a request waits while the pool is short.

Schedulers decide which waiting requests enter and in what order chunks are prefilled:
`FCFS` (vLLM's automatic prefix caching: arrival order, a prompt reuses the longest prefix the
radix tree holds, least recently used tree pages evicted when the pool is short), `LPM`
(SGLang's cache-aware policy: the longest prefix match first; FCFS past 128 waiting requests,
as SGLang does, unless fallback=None); BatchLLM's lives in kvcache.batchllm. Greedy outputs do
not depend on the scheduler: it changes speed and memory, never tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from kvcache.decode import compute_weights
from kvcache.paged import bucket, paged_decode_step, paged_prefill, prefix_groups
from kvcache.pool import PagePool, apply_copies, init_paged_kv
from kvcache.radix import RadixTree

if TYPE_CHECKING:
  from kvcache.batchllm import Request


@dataclasses.dataclass
class EngineConfig:
  """num_pages: the KV page budget (pages of page_size tokens); token_budget: tokens per step
  (decode tokens first, prefill chunks after); chunk: C, the longest prefill chunk;
  max_running: the most sequences at once (vLLM's max_num_seqs; None: only pages limit)."""

  num_pages: int = 4096
  page_size: int = 64
  token_budget: int = 4096
  chunk: int = 512
  max_running: int | None = 256
  decode_attn: str = "auto"

  def __post_init__(self):
    if self.num_pages < 1 or self.token_budget < 1 or self.chunk < 1:
      raise ValueError(f"num_pages, token_budget and chunk must be >= 1, got {self}")


@dataclasses.dataclass
class Output:
  """A request's new tokens (the stop token included when one ended it), or the error that
  kept it from running."""

  tokens: list[int]
  error: str | None = None
  finish: str = ""  # 'stop', 'length' or 'error'


@dataclasses.dataclass
class Seq:
  """A running request: `cached` tokens of its prompt are in its pages (reused or prefilled),
  `out` its new tokens; `group` a scheduler's label (prefix group) or None."""

  idx: int
  req: Request
  cached: int = 0
  out: list[int] = dataclasses.field(default_factory=list)
  group: object = None

  @property
  def prefilled(self) -> bool:
    return self.cached >= len(self.req.prompt)


@dataclasses.dataclass
class Metrics:
  """What a run took: wall time (the steps, without the metrics bookkeeping), compile time (the
  steps that compiled a new shape), tokens, the pages the pool held (peak and integrated over
  time), per-step times and page counts."""

  wall_s: float = 0.0
  compile_s: float = 0.0
  steps: int = 0
  prompt_tokens: int = 0
  output_tokens: int = 0
  prefill_tokens: int = 0  # prompt tokens computed (after prefix reuse)
  tree_tokens: int = 0  # distinct prompt tokens: the prefill any sharing needs at least
  peak_pages: int = 0
  prefill_s: float = 0.0  # in the prefill calls (dispatch to tokens on the host; compiles too)
  decode_s: float = 0.0  # in the decode calls, likewise
  decode_rows: int = 0
  decode_steps: int = 0
  page_seconds: float = 0.0
  step_s: list[float] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)  # held (the tree's cache too)
  live_pages: list[int] = dataclasses.field(default_factory=list)  # held by running sequences
  compiled: list[bool] = dataclasses.field(default_factory=list)

  def summary(self) -> dict:
    """Rates of the requests' tokens (prompt, reused or computed, and output) over the time of
    the steps that compiled nothing (compile steps' time reported apart as compile_s)."""
    steady = self.wall_s - self.compile_s
    total = self.prompt_tokens + self.output_tokens
    saved = self.prompt_tokens - self.prefill_tokens
    best = self.prompt_tokens - self.tree_tokens
    hist, edges = np.histogram(1e3 * np.asarray(self.step_s or [0.0]), bins=12)
    return {
        "wall_s": self.wall_s, "compile_s": self.compile_s, "steps": self.steps,
        "compile_steps": int(np.sum(self.compiled)),
        "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
        "prefill_tokens": self.prefill_tokens, "tree_tokens": self.tree_tokens,
        "total_tokens_per_s": total / max(steady, 1e-9),
        "output_tokens_per_s": self.output_tokens / max(steady, 1e-9),
        "end_to_end_tokens_per_s": total / max(self.wall_s, 1e-9),
        # Where the time goes: the model calls (device time plus dispatch) and the rest (the
        # scheduler, page tables and other host work of the engine).
        "prefill_call_s": self.prefill_s, "decode_call_s": self.decode_s,
        "host_s": self.wall_s - self.prefill_s - self.decode_s,
        "mean_decode_batch": self.decode_rows / max(1, self.decode_steps),
        "prefix_saving_of_optimum": saved / best if best > 0 else 1.0,
        "peak_pages": self.peak_pages, "page_seconds": self.page_seconds,
        "peak_live_pages": max(self.live_pages, default=0),
        "live_page_seconds": float(np.dot(self.live_pages, self.step_s)) if self.step_s else 0.0,
        "step_ms_histogram": hist.tolist(), "step_ms_edges": edges.tolist(),
    }


class Scheduler:
  """The interface: `start` sees every request before the run (an offline batch), `admit` moves
  waiting requests into running sequences while the budgets allow, `prefill_order` ranks the
  sequences with prompt left to prefill, `prefix_rows` names shared-prefix groups among a step's
  rows, `prefilled` / `finished` hear of a sequence's prompt done and of its end."""

  name = "base"

  def start(self, engine: Engine, waiting: list[int]) -> None:
    self.waiting = collections.deque(waiting)

  def admit(self, engine: Engine) -> None:
    raise NotImplementedError

  def prefill_order(self, engine: Engine, seqs: list[Seq]) -> list[Seq]:
    return seqs

  def prefix_rows(self, engine: Engine, seqs: list[Seq]) -> list[tuple[list[int], list[int]]]:
    return []

  def prefilled(self, engine: Engine, seq: Seq) -> None:
    engine.tree.insert(seq.req.prompt, engine.pool.table(seq.idx))

  def finished(self, engine: Engine, seq: Seq) -> None:
    pass

  @property
  def done(self) -> bool:
    return not self.waiting


class FCFS(Scheduler):
  """vLLM's automatic prefix caching: arrival order, the tree's longest stored prefix reused,
  least recently used unlocked tree pages evicted when the pool is short."""

  name = "fcfs_lru"

  def admit(self, engine: Engine) -> None:
    while self.waiting and engine.has_room():
      if not engine.try_admit(self.waiting[0]):
        break
      self.waiting.popleft()


class LPM(FCFS):
  """SGLang's cache-aware scheduling: waiting requests sorted by the length of their longest
  prefix match in the tree; plain arrival order while more than `fallback` wait (SGLang's
  128; None: always sorted)."""

  name = "lpm"

  def __init__(self, fallback: int | None = 128):
    self.fallback = fallback
    if fallback is None:
      self.name = "lpm_nofallback"

  def start(self, engine: Engine, waiting: list[int]) -> None:
    super().start(engine, waiting)
    self._sorted_at = None  # (tree version, waiting count) of the last sort

  def admit(self, engine: Engine) -> None:
    sort = self.fallback is None or len(self.waiting) <= self.fallback
    if sort and self._sorted_at != (engine.tree.version, len(self.waiting)):
      match = {i: engine.tree.match(engine.requests[i].prompt[:-1])[0] for i in self.waiting}
      self.waiting = collections.deque(sorted(self.waiting, key=lambda i: -match[i]))
      self._sorted_at = (engine.tree.version, len(self.waiting))  # re-sorted when either moves
    super().admit(engine)


class Engine:
  """Serves requests to the end over one page pool (see the module docstring)."""

  def __init__(self, model: nnx.Module, config: EngineConfig | None = None):
    self.model = model
    self.cfg = config or EngineConfig()
    self.graphdef, self.params = nnx.split(model)
    self.params = compute_weights(self.graphdef, self.params)  # cast once, not every step

  # Pages ------------------------------------------------------------------------------------------

  def pages_for(self, tokens: int) -> int:
    return -(-tokens // self.cfg.page_size)

  def has_room(self) -> bool:
    return self.cfg.max_running is None or len(self.running) < self.cfg.max_running

  def reserve(self, pages: int) -> bool:
    """Whether `pages` free pages exist, evicting least recently used tree pages if needed."""
    if self.pool.free_pages < pages:
      self.tree.evict(pages)
    return self.pool.free_pages >= pages

  def try_admit(self, i, req: Request | None = None, shared: tuple[list[int], int] | None = None,
                new_tokens: int | None = None, group=None) -> bool:
    """Admits request i (or a scheduler's own sequence i for `req`, e.g. a group prefix) if its
    pages fit: its prompt past the reused prefix plus new_tokens (default max_new_tokens). It
    reuses `shared` (pages, tokens), else the tree's longest stored prefix (evicting least
    recently used tree pages when short). Returns False and changes nothing when they do not
    fit."""
    req = self.requests[i] if req is None else req
    room = req.max_new_tokens if new_tokens is None else new_tokens
    total = self.pages_for(len(req.prompt) + room)

    def reuse():
      return self.tree.match(req.prompt[:-1]) if shared is None else (shared[1], shared[0])

    m, pages = reuse()
    if not self.reserve(total - m // self.cfg.page_size):
      return False
    m, pages = reuse()  # an eviction may have dropped part of the match
    if self.pool.free_pages < total - m // self.cfg.page_size:
      return False
    self.kv = apply_copies(self.kv, self.pool.add(i, pages, m))
    self.kv = apply_copies(self.kv, self.pool.extend(i, len(req.prompt) - m + room))
    self.running[i] = Seq(i, req, m, group=group)
    return True

  def release(self, i) -> None:
    """Ends a scheduler's own sequence (its pages lose a holder)."""
    del self.running[i]
    self.pool.release(i)

  def live_pages(self) -> int:
    """Pages the running sequences hold (without pages only the tree keeps for reuse)."""
    return len({p for i in self.running for p in self.pool.table(i)})

  # The run ----------------------------------------------------------------------------------------

  def _check(self, item) -> Request | str:
    from kvcache.batchllm import Request
    try:
      req = item if isinstance(item, Request) else Request(tuple(item))
    except (ValueError, TypeError) as e:
      return str(e)
    limit = self.model.cfg.max_seq_len
    if len(req.prompt) + req.max_new_tokens > limit:
      return (f"prompt ({len(req.prompt)}) + max_new_tokens ({req.max_new_tokens}) exceeds the "
              f"model's max_seq_len {limit}")
    if max(req.prompt) >= self.model.cfg.vocab_size:
      return f"token id {max(req.prompt)} is outside the vocabulary ({self.model.cfg.vocab_size})"
    if self.pages_for(len(req.prompt) + req.max_new_tokens) > self.cfg.num_pages:
      return (f"needs {self.pages_for(len(req.prompt) + req.max_new_tokens)} pages, the budget "
              f"is {self.cfg.num_pages}")
    return req

  def run(self, requests: Sequence, scheduler: Scheduler | None = None, *,
          progress: bool = True) -> tuple[list[Output], Metrics]:
    """Serves every request to its stop token or max_new_tokens (greedy). A request that cannot
    run (empty, too long, past the vocabulary, larger than the page budget) gets an Output with
    its error; the others complete. Returns (outputs in submission order, Metrics)."""
    from kvcache.batchllm import Request, tree_tokens
    scheduler = scheduler or FCFS()
    c = self.cfg
    checked = [self._check(r) for r in requests]
    self.requests = {i: r for i, r in enumerate(checked) if isinstance(r, Request)}
    outputs = [Output([], r, "error") if isinstance(r, str) else None for r in checked]
    self.pool = PagePool(c.num_pages, c.page_size)
    self.tree = RadixTree(self.pool)
    self.kv = init_paged_kv(self.model.cfg, c.num_pages, c.page_size)
    self.running: dict = {}
    m = Metrics(prompt_tokens=sum(len(r.prompt) for r in self.requests.values()),
                tree_tokens=tree_tokens([r.prompt for r in self.requests.values()])
                if self.requests else 0)
    scheduler.start(self, sorted(self.requests))
    bar = tqdm(total=len(self.requests), desc=f"serve ({scheduler.name})", disable=not progress,
               unit="req")
    while self.requests and (not scheduler.done or self.running):
      t0 = time.perf_counter()
      sizes = paged_prefill._cache_size() + paged_decode_step._cache_size()
      scheduler.admit(self)
      if not self.running:
        raise RuntimeError(f"{scheduler.name}: no request could be admitted with "
                           f"{self.pool.free_pages} free pages (a scheduler bug)")
      done = self._step(scheduler, m)
      for seq in done:
        if seq.idx in self.requests:
          stop = bool(seq.out) and seq.out[-1] in seq.req.stop
          outputs[seq.idx] = Output(seq.out, None, "stop" if stop else "length")
          bar.update(1)
        scheduler.finished(self, seq)
      dt = time.perf_counter() - t0
      compiled = paged_prefill._cache_size() + paged_decode_step._cache_size() > sizes
      m.steps += 1
      m.step_s.append(dt)
      m.compiled.append(compiled)
      m.compile_s += dt if compiled else 0.0
      m.wall_s += dt
      m.page_seconds += self.pool.pages_in_use * dt
      m.pages.append(self.pool.pages_in_use)  # the bookkeeping below is not timed
      m.live_pages.append(self.live_pages())
      bar.set_postfix(tok_s=f"{(m.prefill_tokens + m.output_tokens) / m.wall_s:.0f}",
                      pages=self.pool.pages_in_use, refresh=False)
    bar.close()
    m.peak_pages = self.pool.peak_pages
    return outputs, m

  def _step(self, scheduler: Scheduler, m: Metrics) -> list[Seq]:
    """One step: every prefilled sequence decodes a token, the rest of the token budget goes to
    prefill chunks in the scheduler's order. Returns the sequences that ended."""
    c = self.cfg
    decoding = [s for s in self.running.values() if s.prefilled and s.out]
    budget = c.token_budget - len(decoding)
    ready = [s for s in self.running.values() if not s.prefilled]
    chunks = []
    for s in scheduler.prefill_order(self, ready):
      if budget <= 0:
        break
      n = min(c.chunk, len(s.req.prompt) - s.cached, budget)
      chunks.append((s, n))
      budget -= n
    if not chunks and not decoding:
      raise RuntimeError(f"{scheduler.name}: a step with nothing to run ({len(self.running)} "
                         f"running, {self.pool.free_pages} free pages): the scheduler is stuck")
    ended = []
    if chunks:
      ended += self._prefill(scheduler, chunks, m)
    if decoding:
      ended += self._decode(scheduler, decoding, m)
    for s in ended:
      if s.idx in self.running:
        del self.running[s.idx]
        self.pool.release(s.idx)
    return ended

  def _tables(self, seqs: list[Seq]):
    bb = bucket(len(seqs))
    return bb, jnp.asarray(self.pool.page_tables([s.idx for s in seqs], rows=bb)[0])

  def _prefix(self, scheduler, seqs, bb):
    return prefix_groups(scheduler.prefix_rows(self, seqs), bb, self.cfg.page_size)

  def _prefill(self, scheduler, chunks, m: Metrics) -> list[Seq]:
    seqs = [s for s, _ in chunks]
    bb, tables = self._tables(seqs)
    t = bucket(max(n for _, n in chunks))
    toks = np.zeros((bb, t), np.int32)
    start, lengths = np.zeros(bb, np.int32), np.zeros(bb, np.int32)
    for j, (s, n) in enumerate(chunks):
      toks[j, :n] = s.req.prompt[s.cached:s.cached + n]
      start[j], lengths[j] = s.cached, n
    t0 = time.perf_counter()
    logits, self.kv = paged_prefill(self.graphdef, self.params, self.kv, jnp.asarray(toks),
                                    jnp.asarray(start), jnp.asarray(lengths), tables,
                                    self._prefix(scheduler, seqs, bb), self.cfg.decode_attn)
    nxt = np.asarray(jnp.argmax(logits, -1))
    m.prefill_s += time.perf_counter() - t0
    ended = []
    for j, (s, n) in enumerate(chunks):
      s.cached += n
      m.prefill_tokens += n
      if s.prefilled:
        scheduler.prefilled(self, s)
        if s.idx in self.requests:  # a scheduler's own sequence (a prefix) emits nothing
          ended += self._emit(s, int(nxt[j]), m)
    return ended

  def _decode(self, scheduler, seqs: list[Seq], m: Metrics) -> list[Seq]:
    bb, tables = self._tables(seqs)
    tok = np.zeros(bb, np.int32)
    pos = np.full(bb, -1, np.int32)
    for j, s in enumerate(seqs):
      tok[j] = s.out[-1]
      pos[j] = len(s.req.prompt) + len(s.out) - 1
    t0 = time.perf_counter()
    logits, self.kv = paged_decode_step(self.graphdef, self.params, self.kv, jnp.asarray(tok),
                                        jnp.asarray(pos), tables,
                                        self._prefix(scheduler, seqs, bb), self.cfg.decode_attn)
    nxt = np.asarray(jnp.argmax(logits, -1))
    m.decode_s += time.perf_counter() - t0
    m.decode_rows += len(seqs)
    m.decode_steps += 1
    ended = []
    for j, s in enumerate(seqs):
      ended += self._emit(s, int(nxt[j]), m)
    return ended

  @staticmethod
  def _emit(s: Seq, token: int, m: Metrics) -> list[Seq]:
    s.out.append(token)
    m.output_tokens += 1
    return [s] if token in s.req.stop or len(s.out) >= s.req.max_new_tokens else []
