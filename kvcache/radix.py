"""A token-level radix (prefix) tree over the paged KV pool (SGLang's radix cache, in pages).

Each node holds an edge of tokens at path positions [start, end) and the pages of the pool that
hold them (logical blocks start // S .. (end - 1) // S, where S is the page size); a page that
straddles two nodes is held by both, and every node holds one pool reference on each of its pages.
`match(tokens)` returns the longest stored prefix and its page table: a new sequence reuses those
pages (`PagePool.add`, which copies a partial last page) and prefills from the matched length.
`insert` adds a finished prefill's tokens with its page table, splitting an edge at any token.
Nodes that running sequences use are locked; `evict` frees unlocked leaves, least recently used
first (vLLM's automatic prefix caching evicts LRU too), and `remove` lets a caller that knows its
groups (BatchLLM) release a prefix explicitly.
"""

from __future__ import annotations

import dataclasses
import itertools

from kvcache.pool import PagePool


@dataclasses.dataclass(eq=False)
class Node:
  """An edge of the tree: tokens at path positions [start, start + len(tokens))."""

  tokens: tuple[int, ...]
  start: int
  pages: list[int]
  parent: Node | None = None
  children: dict[int, Node] = dataclasses.field(default_factory=dict)
  lock: int = 0
  last_access: int = 0

  @property
  def end(self) -> int:
    return self.start + len(self.tokens)


class RadixTree:
  """Prefix tree of token sequences whose K/V live in `pool`'s pages."""

  def __init__(self, pool: PagePool):
    self.pool = pool
    self.root = Node((), 0, [])
    self._clock = itertools.count(1)
    self.version = 0  # bumped whenever the stored tokens change (callers cache matches by it)

  # Structure --------------------------------------------------------------------------------------

  def _block_range(self, start: int, end: int) -> range:
    s = self.pool.page_size
    return range(start // s, (end - 1) // s + 1) if end > start else range(0)

  def _walk(self, tokens):
    """(path of nodes fully or partly matched, matched length, tokens matched in the last)."""
    node, path, i = self.root, [], 0
    while i < len(tokens) and tokens[i] in node.children:
      child = node.children[tokens[i]]
      j = 0
      while j < len(child.tokens) and i + j < len(tokens) and child.tokens[j] == tokens[i + j]:
        j += 1
      path.append(child)
      i += j
      if j < len(child.tokens):
        return path, i, j
      node = child
    return path, i, len(path[-1].tokens) if path else 0

  def _split(self, node: Node, j: int) -> Node:
    """Splits node after its j-th token (0 < j < len): returns the new upper node."""
    blocks_up = self._block_range(node.start, node.start + j)
    first = self._block_range(node.start, node.end).start
    up_pages = node.pages[: len(blocks_up)]
    upper = Node(node.tokens[:j], node.start, up_pages, node.parent, {}, node.lock,
                 node.last_access)
    node.parent.children[upper.tokens[0]] = upper
    low_first = (node.start + j) // self.pool.page_size
    lower_pages = node.pages[low_first - first:]
    # The upper node takes its own references; the lower keeps its old ones, then drops the
    # blocks it no longer covers (a straddling block stays held by both).
    self.pool.retain(up_pages)
    self.pool.drop(node.pages[: low_first - first])
    node.tokens, node.start, node.pages, node.parent = node.tokens[j:], node.start + j, \
        lower_pages, upper
    upper.children[node.tokens[0]] = node
    return upper

  def _pages(self, path: list[Node], length: int) -> list[int]:
    """The page table of the first `length` tokens along path (deeper nodes win a straddled
    block: their page holds the tokens after it too)."""
    table: dict[int, int] = {}
    for node in path:
      blocks = self._block_range(node.start, node.end)
      for b, p in zip(blocks, node.pages):
        table[b] = p
    return [table[b] for b in self._block_range(0, length)]

  # Queries ----------------------------------------------------------------------------------------

  def match(self, tokens) -> tuple[int, list[int]]:
    """(matched length m, page table of the first m tokens): the longest stored prefix."""
    tokens = tuple(int(t) for t in tokens)
    path, m, _ = self._walk(tokens)
    now = next(self._clock)
    for node in path:
      node.last_access = now
    return m, self._pages(path, m)

  def insert(self, tokens, table: list[int]) -> int:
    """Stores tokens whose K/V sit in pages `table` (a sequence's page table, logical order).
    Returns how many leading tokens were already stored (their pages are not taken again)."""
    tokens = tuple(int(t) for t in tokens)
    if len(table) < len(self._block_range(0, len(tokens))):
      raise ValueError(f"{len(tokens)} tokens need {len(self._block_range(0, len(tokens)))} "
                       f"pages, the table has {len(table)}")
    path, m, j = self._walk(tokens)
    parent = self.root
    if path:
      last = path[-1]
      parent = self._split(last, j) if j < len(last.tokens) else last
    if m < len(tokens):
      blocks = self._block_range(m, len(tokens))
      pages = [table[b] for b in blocks]
      self.pool.retain(pages)
      leaf = Node(tokens[m:], m, pages, parent, last_access=next(self._clock))
      parent.children[leaf.tokens[0]] = leaf
      self.version += 1
    return m

  def lock(self, tokens, delta: int = 1) -> None:
    """Marks the nodes of a stored prefix as used by a running sequence (delta -1 unlocks)."""
    path, m, j = self._walk(tuple(int(t) for t in tokens))
    if m != len(tokens) or (path and j != len(path[-1].tokens)):
      raise KeyError(f"lock: {len(tokens)} tokens are not a stored node boundary")
    for node in path:
      if node.lock + delta < 0:
        raise ValueError("unlock of a node that is not locked")
    for node in path:
      node.lock += delta

  def leaves(self) -> list[Node]:
    out, stack = [], [self.root]
    while stack:
      n = stack.pop()
      stack.extend(n.children.values())
      if not n.children and n is not self.root:
        out.append(n)
    return out

  def _remove_leaf(self, leaf: Node) -> None:
    del leaf.parent.children[leaf.tokens[0]]
    self.pool.drop(leaf.pages)
    self.version += 1

  def evict(self, pages_needed: int) -> int:
    """Frees unlocked leaves, least recently used first, until the pool has pages_needed free
    pages or nothing unlocked is left. Returns the free page count."""
    while self.pool.free_pages < pages_needed:
      cands = [n for n in self.leaves() if n.lock == 0]
      if not cands:
        break
      self._remove_leaf(min(cands, key=lambda n: n.last_access))
    return self.pool.free_pages

  def remove(self, tokens) -> None:
    """Explicit release: drops the unlocked nodes that hold only tokens of this stored path,
    from its leaf up to the first node another path or a lock still needs."""
    path, m, j = self._walk(tuple(int(t) for t in tokens))
    if m != len(tokens) or not path or j != len(path[-1].tokens):
      raise KeyError(f"remove: {len(tokens)} tokens are not a stored path")
    for node in reversed(path):
      if node.children or node.lock:
        break
      self._remove_leaf(node)

  def stored_tokens(self) -> int:
    """Tokens held by the tree (each shared prefix once)."""
    count, stack = 0, [self.root]
    while stack:
      n = stack.pop()
      count += len(n.tokens)
      stack.extend(n.children.values())
    return count
