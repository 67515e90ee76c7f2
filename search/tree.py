"""The search tree over the paged KV pool: fork, extend by one step, release.

Axes: B children generated together, V vocabulary, W page-table width.

A node is one reasoning step (a run of tokens ending with the step token, or a stop token that
ends the solution); a root is a prompt. One tree may hold several roots (problems searched side
by side in one pool, search.methods.run_searches); nodes never share pages across roots. Only
the frontier holds pool sequences: expanding a node forks its children from its pages (full
pages shared, the last partial page copied) and then releases the node's own sequence, so an
inner node's pages live exactly as long as some descendant leaf still holds them, and a pruned
leaf frees what only it held. All children of one expansion (of every root in it) generate
their step together, one batched jit decode step per token over bucketed shapes (batch and
page-table width rounded up to powers of two: few compilations); a child takes a new page only
when its step reaches one, so the pool holds what was written.

    tree = SearchTree(policy, prompt_ids, step_token=nl, stop_tokens=[eot])
    kids = tree.expand({tree.root: 4})        # four sampled first steps
    tree.release(kids[0])                      # prune one
    tree.path(kids[1])                         # prompt + step tokens
    other = tree.add_root(other_prompt_ids)    # a second problem in the same pool

Memory is counted per root in pages actually held (the distinct pages of its frontier's
tables), with and without the prompt's pages, after every expansion that touched it
(`kv_stats(root)`); `close(root)` releases a root's sequences (`close()`: all).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvcache.decode import compute_weights
from kvcache.host import to_device
from kvcache.paged import bucket, paged_decode_step, paged_prefill
from kvcache.pool import OutOfPages, PagePool, apply_copies, init_paged_kv
from kvcache.sampling import SamplingConfig, sample


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sample(logits, key, cfg: SamplingConfig):
  key, sub = jax.random.split(key)
  return sample(logits, sub, cfg), key


@jax.jit
def _keep(live, new, old):
  """Rows still generating take the new logits; the others keep those after their last token."""
  return jnp.where(live[:, None], new, old)


@dataclasses.dataclass
class Node:
  """One step of a solution.

  Attributes:
    id, parent: the node and its parent's id (None for the root).
    tokens: this step's tokens (the root: the prompt).
    depth: steps from the root (root 0).
    logits: float32 [V] next-token logits after the step's last token (what children sample
      their first token from).
    done: the step ended with a stop token (the solution is complete).
    truncated: the step hit max_step_tokens before a step or stop token.
    children: ids of the nodes expanded from it.
    root: the id of its tree's root (its problem; a root's own id).
  """

  id: int
  parent: int | None
  tokens: list[int]
  depth: int
  root: int = -1
  logits: np.ndarray | None = None
  done: bool = False
  truncated: bool = False
  children: list[int] = dataclasses.field(default_factory=list)


class SearchTree:
  """Trees of sampled steps whose K/V live in one shared page pool (module doc).

  prompt: the first root's tokens (`root`), or None for a pool with no root yet (add_root).
  """

  def __init__(self, model: nnx.Module, prompt: Sequence[int] | None = None, *, step_token: int,
               stop_tokens: Sequence[int] = (), page_size: int = 16, num_pages: int = 4096,
               max_step_tokens: int = 32, max_depth: int = 16, sampling: SamplingConfig | None
               = None, seed: int = 0, decode_attn: str = "auto"):
    if max_step_tokens < 1 or max_depth < 1:
      raise ValueError(f"max_step_tokens and max_depth must be >= 1, got {max_step_tokens}, "
                       f"{max_depth}")
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    self.params = compute_weights(self.graphdef, self.params)  # cast once, not every step
    self.step_token, self.stop_tokens = int(step_token), {int(t) for t in stop_tokens}
    self._ends = np.asarray(sorted(self.stop_tokens | {self.step_token}), np.int64)
    self.max_step_tokens, self.max_depth = max_step_tokens, max_depth
    self.sampling = sampling or SamplingConfig(temperature=1.0)
    self.decode_attn = decode_attn
    self.pool = PagePool(num_pages, page_size)
    self.kv = init_paged_kv(self.cfg, num_pages, page_size)
    self.key = jax.random.key(seed)
    self.nodes: dict[int, Node] = {}
    self.model_calls = 0  # batched jit calls of the policy (prefill + decode steps)
    self.tokens_generated = 0
    self.prompt_pages: dict[int, int] = {}  # root -> pages of its prompt
    # root -> [(pages held, tokens held)] after every expansion that touched it
    self.trace: dict[int, list[tuple[int, int]]] = {}
    self.tokens_by_root: dict[int, int] = {}
    self.steps_generated = 0  # steps kept (a retracted root's steps not counted)
    self._step_tokens = 0  # their tokens
    # Called when the pool runs out of pages inside a step: returns a root to retract (all its
    # sequences released, its children in the step dropped) or None to raise OutOfPages.
    self.on_short = None
    self.root = None if prompt is None else self.add_root(prompt)

  def add_root(self, prompt: Sequence[int]) -> int:
    """A new root (a problem): its prompt prefilled into fresh pages. Returns its id."""
    if not len(prompt):
      raise ValueError("the prompt must hold at least one token")
    if len(prompt) > self.cfg.max_seq_len:
      raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_seq_len "
                       f"{self.cfg.max_seq_len}")
    root = self._new(None, list(prompt), 0)
    self.kv = apply_copies(self.kv, self.pool.add(root.id) + self.pool.extend(root.id,
                                                                              len(prompt)))
    t = bucket(len(prompt))
    toks = np.zeros((1, t), np.int32)
    toks[0, :len(prompt)] = prompt
    tables, _ = self.pool.page_tables([root.id])
    logits, self.kv = paged_prefill(self.graphdef, self.params, self.kv, jnp.asarray(toks),
                                    jnp.zeros((1,), jnp.int32),
                                    jnp.asarray([len(prompt)], jnp.int32), jnp.asarray(tables),
                                    None, self.decode_attn)
    self.model_calls += 1
    root.logits = np.asarray(logits[0], np.float32)
    self.prompt_pages[root.id] = len(self.pool.table(root.id))
    self.trace[root.id] = []
    self.tokens_by_root[root.id] = 0
    self._record([root.id])
    return root.id

  # Bookkeeping ---------------------------------------------------------------------------------

  def _new(self, parent: int | None, tokens: list[int], depth: int) -> Node:
    node = Node(len(self.nodes), parent, tokens, depth)
    node.root = node.id if parent is None else self.nodes[parent].root
    self.nodes[node.id] = node
    if parent is not None:
      self.nodes[parent].children.append(node.id)
    return node

  def _root_of(self, root: int | None) -> int:
    root = self.root if root is None else root
    if root not in self.trace:
      raise ValueError(f"node {root} is not a root of this tree")
    return root

  def _record(self, roots) -> None:
    by_root: dict[int, list[int]] = {r: [] for r in roots}
    for s in self.frontier():
      r = self.nodes[s].root
      if r in by_root:
        by_root[r].append(s)
    for r, seqs in by_root.items():
      pages = len({p for s in seqs for p in self.pool.table(s)})
      self.trace[r].append((pages, self._tokens_held(seqs, r)))

  def pages_held(self, root: int | None = None) -> int:
    """Distinct pool pages the root's frontier holds (its prompt's included)."""
    root = self._root_of(root)
    return len({p for s in self.frontier(root) for p in self.pool.table(s)})

  def tokens_held(self, root: int | None = None) -> int:
    """Distinct step tokens on the paths of the root's frontier, the prompt excluded: the KV
    measure of the ETS paper's code (each shared ancestor counted once, pages ignored)."""
    root = self._root_of(root)
    return self._tokens_held(self.frontier(root), root)

  def _tokens_held(self, seqs, root: int) -> int:
    live: set[int] = set()
    for n in seqs:
      while n is not None and n not in live and n != root:
        live.add(n)
        n = self.nodes[n].parent
    return sum(len(self.nodes[i].tokens) for i in live)

  def held(self, node_id: int) -> bool:
    """Whether the node still holds a pool sequence (it is on the frontier)."""
    return node_id in self.pool

  def frontier(self, root: int | None = None) -> list[int]:
    """Nodes holding pages: the leaves that are still alive (finished ones included); of one
    root, or of all with root None."""
    seqs = [s for s in self.pool.sequences() if isinstance(s, int)]
    return seqs if root is None else [s for s in seqs if self.nodes[s].root == root]

  def path(self, node_id: int) -> list[int]:
    """All tokens from the prompt to the end of the node's step."""
    parts = []
    n: int | None = node_id
    while n is not None:
      parts.append(self.nodes[n].tokens)
      n = self.nodes[n].parent
    return [t for p in reversed(parts) for t in p]

  def steps(self, node_id: int) -> list[list[int]]:
    """The step tokens from the root's first child to the node (the prompt left out)."""
    out = []
    n: int | None = node_id
    while n is not None and self.nodes[n].parent is not None:
      out.append(self.nodes[n].tokens)
      n = self.nodes[n].parent
    return out[::-1]

  def release(self, node_id: int) -> None:
    """Prunes a leaf: its pages lose one holder (freed when no other leaf shares them)."""
    if not self.held(node_id):
      raise ValueError(f"node {node_id} holds no pages (already released or expanded)")
    self.pool.release(node_id)

  def close(self, root: int | None = None) -> None:
    """Releases every sequence still held (of one root, or all with root None)."""
    for s in self.frontier(root) if root is not None else list(self.pool.sequences()):
      self.pool.release(s)

  def mean_step_tokens(self) -> float:
    """Tokens per generated step so far (max_step_tokens before the first step)."""
    if not self.steps_generated:
      return float(self.max_step_tokens)
    return self._step_tokens / self.steps_generated

  def expansion_pages(self, counts: dict[int, int], step_tokens: int | None = None) -> int:
    """The pages `expand(counts)` takes from the free list if every step has step_tokens tokens
    (default max_step_tokens: an upper bound): each child's copy of its parent's partial last
    page and the pages its step reaches."""
    p = self.pool.page_size
    t = self.max_step_tokens if step_tokens is None else step_tokens
    need = 0
    for nid, c in counts.items():
      length = self.pool.length(nid)
      need += c * (-(-(length + t) // p) - length // p)
    return need

  def retract(self, root: int) -> None:
    """Drops a root's whole search: every sequence it holds is released."""
    self._root_of(root)
    for s in self.frontier(root):
      self.pool.release(s)

  # Expansion -----------------------------------------------------------------------------------

  def expand(self, counts: dict[int, int]) -> list[int]:
    """Children for each node of `counts` (node -> how many), each one sampled step, generated
    together (nodes of several roots alike). A held node is released after its children are
    forked (counts of 0 release it: pruning). Finished nodes (done) cannot be expanded. Returns
    the new nodes' ids, in the order of `counts`."""
    for nid, c in counts.items():
      if c < 0:
        raise ValueError(f"count {c} for node {nid} must be >= 0")
      if nid not in self.nodes or not self.held(nid):
        raise ValueError(f"node {nid} holds no pages (released or already expanded)")
      if c and self.nodes[nid].done:
        raise ValueError(f"node {nid} ended its solution and cannot be expanded")
    kids: list[Node] = []
    dropped: set[int] = set()  # roots retracted on the way (on_short)
    for nid, c in counts.items():
      node = self.nodes[nid]
      for _ in range(c):
        if node.root in dropped:
          break
        kid = self._new(nid, [], node.depth + 1)
        if self._take(lambda nid=nid, kid=kid: self.pool.fork(nid, kid.id), node.root,
                      dropped):
          kids.append(kid)
      if node.root not in dropped:
        self.pool.release(nid)
    kids = [k for k in kids if k.root not in dropped]
    if kids:
      self._generate(kids, dropped)
    self._record(sorted({self.nodes[n].root for n in counts} - dropped))
    return [k.id for k in kids if k.root not in dropped]

  def _take(self, alloc, root: int, dropped: set[int]) -> bool:
    """Runs a pool allocation (fork, extend) and its page copies; when the pool is short,
    retracts the roots on_short names until it fits. False if `root` itself was retracted."""
    while True:
      try:
        self.kv = apply_copies(self.kv, alloc())
        return True
      except OutOfPages:
        victim = self.on_short() if self.on_short is not None else None
        if victim is None:
          raise
        self.retract(victim)
        dropped.add(victim)
        if victim == root:
          return False

  def _generate(self, kids: list[Node], dropped: set[int]) -> None:
    """Samples every kid's step; roots retracted on the way (on_short) join `dropped`."""
    b = len(kids)
    bb = bucket(b)
    ps, steps = self.pool.page_size, self.max_step_tokens
    ids = [k.id for k in kids]
    start = np.zeros(bb, np.int64)
    start[:b] = [self.pool.length(i) for i in ids]
    # The table width covers a whole step, so it stays one shape for the step's decode calls.
    width = bucket(-(-int(start.max() + steps) // ps))
    tables, _ = self.pool.page_tables(ids, width=width, rows=bb)
    have = np.zeros(bb, np.int64)  # pages in each child's table
    have[:b] = [len(self.pool.table(i)) for i in ids]
    logits = jnp.asarray(np.pad(np.stack([self.nodes[k.parent].logits for k in kids]),
                                ((0, bb - b), (0, 0))))
    live = np.zeros(bb, bool)
    live[:b] = True
    toks = np.zeros((b, steps), np.int64)
    n = np.zeros(b, np.int64)
    # tables and live change in place between tokens: they go to the device through
    # kvcache.host.to_device (a private host copy), since the transfer may read the buffer after
    # the call returned (jnp.array copies no more than jnp.asarray does).
    for t in range(steps):
      tok, self.key = _sample(logits, self.key, self.sampling)
      pos = start + t
      for j in np.flatnonzero(live & (pos // ps >= have)):  # a new page at a page's start
        if kids[j].root in dropped:  # retracted while this loop ran
          continue
        grow = int(pos[j]) + 1 - self.pool.length(ids[j])
        if self._take(lambda j=j, grow=grow: self.pool.extend(ids[j], grow), kids[j].root,
                      dropped):
          tables[j, have[j]] = self.pool.table(ids[j])[-1]
          have[j] += 1
      if dropped:
        live[:b] &= np.asarray([k.root not in dropped for k in kids])
      tok = np.array(tok)  # a host copy (a view of the device buffer can be reused under it)
      out, self.kv = paged_decode_step(self.graphdef, self.params, self.kv,
                                       jnp.asarray(np.where(live, tok, 0).astype(np.int32)),
                                       jnp.asarray(np.where(live, pos, -1).astype(np.int32)),
                                       to_device(tables), None, self.decode_attn)
      self.model_calls += 1
      rows = np.flatnonzero(live[:b])
      toks[rows, t] = tok[rows]
      n[rows] += 1
      logits = _keep(to_device(live), out, logits)
      live[rows] &= ~np.isin(tok[rows], self._ends)
      if not live.any():
        break
    self.tokens_generated += int(n.sum())
    last = np.array(logits[:b], np.float32)  # a host copy, not a view of a device buffer
    for j, k in enumerate(kids):
      if k.root in dropped:
        continue
      self.steps_generated += 1
      self._step_tokens += int(n[j])
      k.tokens = toks[j, :n[j]].tolist()
      self.tokens_by_root[k.root] += int(n[j])
      # The pool's length lags inside a page (set when a page was taken): bring it to the end.
      self.kv = apply_copies(self.kv, self.pool.extend(k.id, int(start[j] + n[j])
                                                       - self.pool.length(k.id)))
      k.logits = last[j].copy()
      end = k.tokens[-1]
      k.truncated = end != self.step_token and end not in self.stop_tokens
      k.done = end in self.stop_tokens or k.depth >= self.max_depth

  # Memory ----------------------------------------------------------------------------------------

  def kv_stats(self, root: int | None = None) -> dict:
    """The root's pages held: peak and mean over its expansions, with and without its prompt's
    pages; and the distinct step tokens held (tokens_held), peak and mean."""
    root = self._root_of(root)
    held = np.asarray([h for h, _ in self.trace[root]], np.float64)
    prompt = self.prompt_pages[root]
    toks = np.asarray([t for _, t in self.trace[root]], np.float64)
    return {"peak_pages": float(held.max()), "mean_pages": float(held.mean()),
            "peak_pages_no_prompt": float(held.max() - prompt),
            "mean_pages_no_prompt": float(held.mean() - prompt),
            "peak_tokens_no_prompt": float(toks.max()), "mean_tokens_no_prompt": float(toks.mean()),
            "page_size": self.pool.page_size, "prompt_pages": prompt}
