"""The search tree over the paged KV pool: fork, extend by one step, release.

Axes: B children generated together, V vocabulary, W page-table width.

A node is one reasoning step (a run of tokens ending with the step token, or a stop token that
ends the solution); the root is the prompt. Only the frontier holds pool sequences: expanding a
node forks its children from its pages (full pages shared, the last partial page copied) and
then releases the node's own sequence, so an inner node's pages live exactly as long as some
descendant leaf still holds them, and a pruned leaf frees what only it held. All children of
one expansion generate their step together, one batched jit decode step per token over
bucketed shapes (batch and page-table width rounded up to powers of two: few compilations).

    tree = SearchTree(policy, prompt_ids, step_token=nl, stop_tokens=[eot])
    kids = tree.expand({tree.root: 4})        # four sampled first steps
    tree.release(kids[0])                      # prune one
    tree.path(kids[1])                         # prompt + step tokens

Memory is counted in pages actually held (pool.pages_in_use), with and without the prompt's
pages, after every expansion (`page_trace`); `close()` releases everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvcache.decode import compute_weights
from kvcache.paged import bucket, paged_decode_step, paged_prefill
from kvcache.pool import PagePool, apply_copies, init_paged_kv
from kvcache.sampling import SamplingConfig, sample


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
  """

  id: int
  parent: int | None
  tokens: list[int]
  depth: int
  logits: np.ndarray | None = None
  done: bool = False
  truncated: bool = False
  children: list[int] = dataclasses.field(default_factory=list)


class SearchTree:
  """A tree of sampled steps whose K/V live in one shared page pool (module doc)."""

  def __init__(self, model: nnx.Module, prompt: Sequence[int], *, step_token: int,
               stop_tokens: Sequence[int] = (), page_size: int = 16, num_pages: int = 4096,
               max_step_tokens: int = 32, max_depth: int = 16, sampling: SamplingConfig | None
               = None, seed: int = 0, decode_attn: str = "auto"):
    if not prompt:
      raise ValueError("the prompt must hold at least one token")
    if max_step_tokens < 1 or max_depth < 1:
      raise ValueError(f"max_step_tokens and max_depth must be >= 1, got {max_step_tokens}, "
                       f"{max_depth}")
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    self.params = compute_weights(self.graphdef, self.params)  # cast once, not every step
    self.step_token, self.stop_tokens = int(step_token), {int(t) for t in stop_tokens}
    self.max_step_tokens, self.max_depth = max_step_tokens, max_depth
    self.sampling = sampling or SamplingConfig(temperature=1.0)
    self.decode_attn = decode_attn
    self.pool = PagePool(num_pages, page_size)
    self.kv = init_paged_kv(self.cfg, num_pages, page_size)
    self.key = jax.random.key(seed)
    self.nodes: dict[int, Node] = {}
    self.model_calls = 0  # batched jit calls of the policy (prefill + decode steps)
    self.tokens_generated = 0
    self.page_trace: list[tuple[int, int]] = []  # (pages held, prompt pages) per expansion
    self.token_trace: list[int] = []  # tokens_held() per expansion
    root = self._new(None, list(prompt), 0)
    self.root = root.id
    self.kv = apply_copies(self.kv, self.pool.add(root.id) + self.pool.extend(root.id,
                                                                              len(prompt)))
    t = bucket(len(prompt))
    toks = np.zeros((1, t), np.int32)
    toks[0, :len(prompt)] = prompt
    tables, _ = self.pool.page_tables([root.id])
    logits, self.kv = paged_prefill(self.graphdef, self.params, self.kv, jnp.asarray(toks),
                                    jnp.zeros((1,), jnp.int32),
                                    jnp.asarray([len(prompt)], jnp.int32), jnp.asarray(tables),
                                    None, decode_attn)
    self.model_calls += 1
    root.logits = np.asarray(logits[0], np.float32)
    self.prompt_pages = len(self.pool.table(root.id))
    self._record()

  # Bookkeeping ---------------------------------------------------------------------------------

  def _new(self, parent: int | None, tokens: list[int], depth: int) -> Node:
    node = Node(len(self.nodes), parent, tokens, depth)
    self.nodes[node.id] = node
    if parent is not None:
      self.nodes[parent].children.append(node.id)
    return node

  def _record(self) -> None:
    self.page_trace.append((self.pool.pages_in_use, self.prompt_pages))
    self.token_trace.append(self.tokens_held())

  def tokens_held(self) -> int:
    """Distinct step tokens on the paths of the frontier, the prompt excluded: the KV measure
    of the ETS paper's code (each shared ancestor counted once, pages ignored)."""
    live: set[int] = set()
    for n in self.frontier():
      while n is not None and n not in live and n != self.root:
        live.add(n)
        n = self.nodes[n].parent
    return sum(len(self.nodes[i].tokens) for i in live)

  def held(self, node_id: int) -> bool:
    """Whether the node still holds a pool sequence (it is on the frontier)."""
    return node_id in self.pool.sequences()

  def frontier(self) -> list[int]:
    """Nodes holding pages: the leaves that are still alive (finished ones included)."""
    return [s for s in self.pool.sequences() if isinstance(s, int)]

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

  def close(self) -> None:
    """Releases every sequence still held."""
    for s in list(self.pool.sequences()):
      self.pool.release(s)

  # Expansion -----------------------------------------------------------------------------------

  def expand(self, counts: dict[int, int]) -> list[int]:
    """Children for each node of `counts` (node -> how many), each one sampled step, generated
    together. A held node is released after its children are forked (counts of 0 release it:
    pruning). Finished nodes (done) cannot be expanded. Returns the new nodes' ids."""
    kids: list[Node] = []
    for nid, c in counts.items():
      node = self.nodes[nid]
      if c < 0:
        raise ValueError(f"count {c} for node {nid} must be >= 0")
      if c and node.done:
        raise ValueError(f"node {nid} ended its solution and cannot be expanded")
      if not self.held(nid):
        raise ValueError(f"node {nid} holds no pages (released or already expanded)")
      for _ in range(c):
        kid = self._new(nid, [], node.depth + 1)
        self.kv = apply_copies(self.kv, self.pool.fork(nid, kid.id))
        kids.append(kid)
      self.pool.release(nid)
    if kids:
      self._generate(kids)
    self._record()
    return [k.id for k in kids]

  def _generate(self, kids: list[Node]) -> None:
    b = len(kids)
    bb = bucket(b)
    logits = np.stack([self.nodes[k.parent].logits for k in kids])
    logits = np.pad(logits, ((0, bb - b), (0, 0)))
    live = np.ones(b, bool)
    for _ in range(self.max_step_tokens):
      self.key, sub = jax.random.split(self.key)
      tok = np.asarray(sample(jnp.asarray(logits), sub, self.sampling))
      pos = np.full(bb, -1, np.int32)
      for j, k in enumerate(kids):
        if live[j]:
          pos[j] = self.pool.length(k.id)
          self.kv = apply_copies(self.kv, self.pool.extend(k.id, 1))
          k.tokens.append(int(tok[j]))
      tables, _ = self.pool.page_tables([k.id for k in kids], rows=bb)
      out, self.kv = paged_decode_step(self.graphdef, self.params, self.kv,
                                       jnp.asarray(np.where(pos >= 0, tok, 0).astype(np.int32)),
                                       jnp.asarray(pos), jnp.asarray(tables), None,
                                       self.decode_attn)
      self.model_calls += 1
      out = np.asarray(out, np.float32)
      for j, k in enumerate(kids):
        if not live[j]:
          continue
        self.tokens_generated += 1
        logits[j] = out[j]
        t = k.tokens[-1]
        if t == self.step_token or t in self.stop_tokens:
          live[j] = False
          k.done = t in self.stop_tokens or k.depth >= self.max_depth
      if not live.any():
        break
    for j, k in enumerate(kids):
      k.logits = logits[j].copy()
      if live[j]:
        k.truncated = True
        k.done = k.depth >= self.max_depth

  # Memory ----------------------------------------------------------------------------------------

  def kv_stats(self) -> dict:
    """Pages held: peak and mean over the expansions, with and without the prompt's pages; and
    the distinct step tokens held (tokens_held), peak and mean."""
    held = np.asarray([h for h, _ in self.page_trace], np.float64)
    no_prompt = np.asarray([h - p for h, p in self.page_trace], np.float64)
    toks = np.asarray(self.token_trace, np.float64)
    return {"peak_pages": float(held.max()), "mean_pages": float(held.mean()),
            "peak_pages_no_prompt": float(no_prompt.max()),
            "mean_pages_no_prompt": float(no_prompt.mean()),
            "peak_tokens_no_prompt": float(toks.max()), "mean_tokens_no_prompt": float(toks.mean()),
            "page_size": self.pool.page_size, "prompt_pages": self.prompt_pages}
