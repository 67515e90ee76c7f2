"""BatchLLM's host-side planning: a global prefix tree over a batch, one level of prefix groups.

BatchLLM (Zheng et al., arXiv 2412.03594) sees the whole batch before it schedules anything, so
it finds the shared prefixes explicitly instead of hoping an LRU prefix cache keeps them:
1. `build_prefix_tree`: a token-level radix tree over every prompt of the batch.
2. `group_prompts`: the tree flattened to ONE level of prefix-sharing groups: each group's
   prefix is prefilled once and its members prefill only their suffixes (the gain rule;
   here an exact dynamic program, see its docstring).
3. `order_groups`: groups with a larger decode / prompt ratio first, so their long decodes
   overlap the later groups' prefill chunks.

Cost model (prefill tokens computed): a group with prefix p and members m costs
len(p) + sum_m (len(prompt_m) - len(p)); `tree_tokens` is the floor any sharing can reach
(every distinct tree token prefilled once).

    groups = order_groups(group_prompts([r.prompt for r in requests]), requests)
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
from collections.abc import Iterator, Sequence

import numpy as np

from kvcache.engine import Scheduler

Tokens = tuple[int, ...]


def _tokens(seq, what: str = "prompt") -> Tokens:
  """seq as a tuple of non-negative Python ints; ValueError naming `what` otherwise."""
  if isinstance(seq, np.ndarray):
    if seq.ndim != 1 or seq.dtype.kind not in "iu":
      raise ValueError(f"{what} must be a 1-D integer array, got {seq.dtype} {seq.shape}")
    out = tuple(seq.tolist())
  else:
    if isinstance(seq, (str, bytes)):
      raise ValueError(f"{what} must be a sequence of int token ids, got {type(seq).__name__}")
    out = tuple(seq)
    if set(map(type, out)) - {int}:  # the fast path (C loops) when all are Python ints
      for t in out:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
          raise ValueError(f"{what} token ids must be ints, got {t!r} ({type(t).__name__})")
      out = tuple(int(t) for t in out)
  if out and min(out) < 0:
    raise ValueError(f"{what} token ids must be >= 0, got {min(out)}")
  return out


def _prompts(prompts: Sequence[Sequence[int]]) -> list[Tokens]:
  out = [_tokens(p, f"prompt {i}") for i, p in enumerate(prompts)]
  for i, p in enumerate(out):
    if not p:
      raise ValueError(f"prompt {i} is empty (the last prompt token must be prefilled)")
  return out


@dataclasses.dataclass(frozen=True)
class Request:
  """One request of a batch.

  Attributes:
    prompt: token ids (lists and integer arrays are converted to a tuple).
    max_new_tokens: decode budget (>= 1).
    stop: token ids that end the generation early.
  """

  prompt: Tokens
  max_new_tokens: int = 32
  stop: Tokens = ()

  def __post_init__(self):
    object.__setattr__(self, "prompt", _tokens(self.prompt))
    object.__setattr__(self, "stop", _tokens(self.stop, "stop"))
    if not self.prompt:
      raise ValueError("prompt is empty (the last prompt token must be prefilled)")
    n = self.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
    object.__setattr__(self, "max_new_tokens", int(n))


def make_request(prompt: Sequence[int], max_new_tokens: int = 32,
                 stop: Sequence[int] = ()) -> Request:
  """A Request from any int sequence (list, tuple, integer array)."""
  return Request(prompt, max_new_tokens, stop)


@dataclasses.dataclass(eq=False)
class TreeNode:
  """A node of the batch's radix tree: the edge into it and everything below it.

  Attributes:
    tokens: the edge's token ids (() at the root); the node's path is the concatenation of the
      edges from the root, of length `depth`.
    depth: path length (tokens from the root through this edge).
    children: child nodes keyed by their edge's first token.
    ends: indices of prompts equal to this node's path (several for duplicate prompts).
    prompts: indices of all prompts in the subtree (ending here or passing through), ascending.
  """

  tokens: Tokens
  depth: int
  children: dict[int, TreeNode] = dataclasses.field(default_factory=dict)
  ends: list[int] = dataclasses.field(default_factory=list)
  prompts: list[int] = dataclasses.field(default_factory=list)

  @property
  def leaves(self) -> int:
    """leaves(g) of the paper: the number of prompts in the subtree."""
    return len(self.prompts)

  def walk(self) -> Iterator[TreeNode]:
    """Every node of the subtree, parents before children (iterative, no recursion limit)."""
    stack = [self]
    while stack:
      node = stack.pop()
      yield node
      stack.extend(reversed(list(node.children.values())))


def _common(a: Tokens, b: Tokens, start: int = 0) -> int:
  """Length of the common prefix of a and b[start:] (binary search over C-level slice
  compares: O(L log L) in C instead of a Python loop over tokens)."""
  hi = min(len(a), len(b) - start)
  if a[:hi] == b[start:start + hi]:
    return hi
  lo = 0  # a[:lo] matches, a[:hi] does not
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if a[:mid] == b[start:start + mid]:
      lo = mid
    else:
      hi = mid
  return lo


def build_prefix_tree(prompts: Sequence[Sequence[int]]) -> TreeNode:
  """The radix tree of all prompts of a batch (built before scheduling).

  Args:
    prompts: n non-empty token sequences.
  Returns:
    The root (depth 0, empty edge); prompt i ends at the node whose path equals it.
  """
  ps = _prompts(prompts)
  root = TreeNode((), 0)
  for idx, p in enumerate(ps):
    node, i = root, 0
    while i < len(p):
      child = node.children.get(p[i])
      if child is None:
        child = node.children[p[i]] = TreeNode(p[i:], len(p))
        node, i = child, len(p)
        break
      k = _common(child.tokens, p, i)
      if k < len(child.tokens):  # split the edge after k tokens
        upper = TreeNode(child.tokens[:k], node.depth + k, {child.tokens[k]: child})
        child.tokens = child.tokens[k:]
        child = node.children[p[i]] = upper
      node, i = child, i + k
    node.ends.append(idx)
  for node in reversed(list(root.walk())):  # children before parents
    node.prompts = sorted([*node.ends, *(j for c in node.children.values() for j in c.prompts)])
  return root


def tree_tokens(prompts: Sequence[Sequence[int]]) -> int:
  """Distinct tokens of the prefix tree: the prefill cost if every tree node were computed
  once (what multi-level sharing could reach; a one-level grouping costs at least this)."""
  return sum(len(n.tokens) for n in build_prefix_tree(prompts).walk())


@dataclasses.dataclass
class PrefixGroup:
  """Requests that share one prefilled prefix.

  Attributes:
    prefix: the shared prefix tokens (() when there is nothing to share, e.g. one member).
    members: request indices, in submission order.
  """

  prefix: Tokens
  members: list[int]


def group_prompts(prompts: Sequence[Sequence[int]]) -> list[PrefixGroup]:
  """BatchLLM's one-level prefix groups with the fewest prefill tokens.

  Every prompt is in exactly one group; a group's prefix is a common prefix of its members and
  at most len(prompt) - 1 long for each (the last token is prefilled for the first logits).
  Cost of a group with prefix length L and k members = sum of their lengths - (k - 1) * L, so
  the grouping maximises the savings sum (k - 1) * L over groups.

  Gain rule. The paper keeps a tree node g as its own group prefix instead of leaving its
  prompts in the group of the ancestor prefix c when (leaves(g) - 1) * |g| - |c| > 0. That is
  exactly the change in savings: g's k prompts leave c's group (- k * |c|) and share g's path
  (+ (k - 1) * (|c| + |g|)), so the difference is (k - 1) * |g| - |c|, with |c| the ancestor
  group's prefix length and |g| the tokens g adds. Here the rule is applied exactly rather than
  greedily, by a bottom-up dynamic program over the radix tree:
    h(x, a) = the best savings inside x's subtree when the prompts it passes up join an
              ancestor group whose prefix has length a (each passed prompt earns a; a = 0: no
              ancestor group, they stay alone).
  At a node x of depth D with E prompts ending exactly at it, and S(v) = sum over children of
  h(child, v), the options are
    pass all up:            S(a) + a * E
    x is a group prefix:    S(D) - D + a * E     (its members: what the children pass up)
    prefix of D - 1 tokens: S(D - 1) + (D - 1) * (E - 1), for the E prompts ending at x that
                            cannot use all D tokens (only when D - 1 is deeper than the parent)
    both of the last two:   S(D) - D + (D - 1) * (E - 1).
  "x is a group prefix" beats "pass up" by (k - 1) * (D - a) - a, the gain rule with leaves(g)
  replaced by the k prompts that deeper groups left over. Groups may nest in the tree (a group
  at a stem plus groups deeper in it), which the one-level layout allows: each group's prefix
  is prefilled on its own. No other prefix can do better: an optimal grouping puts each prompt
  in the deepest chosen prefix it can use, and the best prefix for a set of prompts of one
  subtree is the node's path, or one token less when some prompt ends at the node. Ties go to
  fewer groups; each final prefix is widened to its members' longest common prefix (capped).

  Args:
    prompts: n non-empty token sequences.
  Returns:
    Groups ordered by their first member; members ascending; single-member groups have ().
  """
  ps = _prompts(prompts)
  root = build_prefix_tree(ps)
  order = list(root.walk())
  values: dict[int, set[int]] = {id(root): {0}}  # a-values each node's h is needed at
  mid_ok: dict[int, bool] = {}
  for node in order:  # parents first: a child needs its ancestors' group depths
    if node is not root:
      up = values[id(node)] | {node.depth} | ({node.depth - 1} if mid_ok[id(node)] else set())
    for c in node.children.values():
      mid_ok[id(c)] = bool(c.ends) and c.depth - 1 > node.depth
      values[id(c)] = {0} if node is root else up
  h: dict[int, dict[int, int]] = {}
  choice: dict[tuple[int, int], int] = {}

  def options(node: TreeNode, a: int) -> list[int]:
    """Values of the four options (pass up, group at D, group at D - 1, both) at node."""
    s = lambda v: sum(h[id(c)][v] for c in node.children.values())
    d, e = node.depth, len(node.ends)
    out = [s(a) + a * e, s(d) - d + a * e]
    if mid_ok[id(node)]:
      out += [s(d - 1) + (d - 1) * (e - 1), s(d) - d + (d - 1) * (e - 1)]
    return out

  for node in reversed(order):
    if node is root:
      break
    h[id(node)] = {}
    for a in values[id(node)]:
      opts = options(node, a)
      best = max(range(len(opts)), key=lambda i: (opts[i], -i))  # ties: fewer groups
      h[id(node)][a], choice[id(node), a] = opts[best], best

  groups: list[list[int]] = []
  stack: list[tuple[TreeNode, int, int | None]] = [(c, 0, None) for c in root.children.values()]
  while stack:
    node, a, gid = stack.pop()
    best = choice[id(node), a]
    end_gid, down = gid, (a, gid)
    if best in (2, 3):  # a group of prefix D - 1 for the prompts ending here
      groups.append([])
      end_gid = len(groups) - 1
      down = (node.depth - 1, end_gid)
    if best in (1, 3):  # a group of prefix D for what the children pass up
      groups.append([])
      down = (node.depth, len(groups) - 1)
    for i in node.ends:
      if end_gid is None:
        groups.append([i])
      else:
        groups[end_gid].append(i)
    stack.extend((c, *down) for c in node.children.values())

  out = []
  for members in groups:
    if not members:
      continue
    members.sort()
    prefix: Tokens = ()
    if len(members) > 1:
      first = ps[members[0]]
      n = min(len(ps[m]) for m in members) - 1
      for m in members[1:]:
        n = min(n, _common(first, ps[m]))
      prefix = first[:n]
    out.append(PrefixGroup(prefix, members))
  out.sort(key=lambda g: g.members[0])
  return out


def _check_groups(groups: Sequence[PrefixGroup], n: int, complete: bool = True) -> None:
  """ValueError unless the groups hold request indices in [0, n) at most once each (exactly
  once each when `complete`)."""
  counts = collections.Counter(m for g in groups for m in g.members)
  bad = sorted(m for m in counts if not 0 <= m < n)
  twice = sorted(m for m, c in counts.items() if c > 1)
  missing = sorted(set(range(n)) - set(counts)) if complete else []
  if bad or twice or missing:
    how = "exactly" if complete else "at most"
    raise ValueError(f"groups must hold each of the {n} requests {how} once: out of range "
                     f"{bad[:8]}, repeated {twice[:8]}, missing {missing[:8]}")


def prefill_tokens(groups: Sequence[PrefixGroup], prompts: Sequence[Sequence[int]]) -> int:
  """Prefill tokens computed: sum over groups of len(prefix) + sum of members' suffixes.

  Raises ValueError unless every prompt is in exactly one group and each prefix is a prefix of
  its members that leaves at least one token to prefill.
  """
  ps = _prompts(prompts)
  _check_groups(groups, len(ps))
  total = 0
  for g in groups:
    n = len(g.prefix)
    for m in g.members:
      if len(ps[m]) <= n or ps[m][:n] != tuple(g.prefix):
        raise ValueError(f"prefix of {n} tokens is not a proper prefix of prompt {m}")
    total += n + sum(len(ps[m]) - n for m in g.members)
  return total


def order_groups(groups: Sequence[PrefixGroup], requests: Sequence[Request]) -> list[PrefixGroup]:
  """BatchLLM's reorder: groups with a larger decode / prompt ratio first, stable.

  ratio = sum of members' max_new_tokens / (len(prefix) + sum of members' suffix lengths),
  compared exactly (fractions), so equal ratios keep their input order. The groups may be a
  subset of the batch (each request at most once).
  """
  _check_groups(groups, len(requests), complete=False)

  def ratio(g: PrefixGroup) -> fractions.Fraction:
    n = len(g.prefix)
    prompt = n + sum(len(requests[m].prompt) - n for m in g.members)
    return fractions.Fraction(sum(requests[m].max_new_tokens for m in g.members), prompt)

  return sorted(groups, key=ratio, reverse=True)


class BatchLLM(Scheduler):
  """BatchLLM's scheduling over the engine: the groups of the whole batch (group_prompts), in
  decode-ratio order (order_groups), one group after another. A group's prefix is admitted and
  prefilled once, as its own sequence (reusing what the tree stores of it); its members share
  the prefix's pages (entering once it is prefilled, each with a copy of its partial last page),
  prefill only the rest, and attend the prefix's full pages once for the whole group
  (shared-prefix attention, in prefill and decode). Requests
  enter while their pages fit (memory-centric batching: no request count cap unless the engine
  has one); when a group's last member ends, its prefix is released from the tree explicitly,
  so the prefix KV lives only as long as its group."""

  name = "batchllm"

  def __init__(self, reorder: bool = True):
    self.reorder = reorder
    if not reorder:
      self.name = "batchllm_noreorder"

  def start(self, engine, waiting: list[int]) -> None:
    reqs = [engine.requests[i] for i in waiting]
    groups = group_prompts([r.prompt for r in reqs])
    if self.reorder:
      groups = order_groups(groups, reqs)
    self.groups = collections.deque(
        PrefixGroup(g.prefix, [waiting[j] for j in g.members]) for g in groups)
    self.left: dict[int, int] = {}  # group -> members not yet ended
    self.prefix: dict[int, tuple[int, ...]] = {}
    self.current: tuple[int, collections.deque] | None = None
    self.member_of: dict[int, int] = {}
    self.next_id = 0

  @property
  def done(self) -> bool:
    return not self.groups and not (self.current and self.current[1])

  def _shared(self, engine, gid: int) -> tuple[list[int], int] | None:
    """(full pages of the group's prefix, their tokens), or None without one."""
    full = len(self.prefix[gid]) // engine.cfg.page_size
    if not full:
      return None
    return engine.pool.table(("prefix", gid))[:full], full * engine.cfg.page_size

  def admit(self, engine) -> None:
    while engine.has_room():
      if not self.current or not self.current[1]:
        if not self.groups:
          return
        g = self.groups[0]
        gid = self.next_id
        # A prefix shorter than a page shares no page: its members reuse what the tree holds.
        prefix = tuple(g.prefix) if len(g.prefix) >= engine.cfg.page_size else ()
        if prefix:  # the prefix enters with room for its largest member, or waits
          full = len(prefix) // engine.cfg.page_size
          own = max(engine.pages_for(len(engine.requests[i].prompt)
                                     + engine.requests[i].max_new_tokens) for i in g.members)
          if not engine.reserve(engine.pages_for(len(prefix)) + own - full):
            if engine.running:
              return
            prefix = ()  # even an empty pool cannot hold both: the members go without it
        self.prefix[gid] = prefix
        if prefix and not engine.try_admit(("prefix", gid), Request(prefix, 1), new_tokens=0):
          del self.prefix[gid]
          return
        self.groups.popleft()
        self.next_id += 1
        self.left[gid] = len(g.members)
        self.current = (gid, collections.deque(g.members))
      gid, members = self.current
      shared, prefix = None, self.prefix[gid]
      if prefix:  # members enter once the prefix is in its pages: they copy its partial page
        if not engine.running[("prefix", gid)].prefilled:
          return
        shared = (engine.pool.table(("prefix", gid)), len(prefix))
      if not engine.try_admit(members[0], shared=shared, group=gid if prefix else None):
        return
      self.member_of[members.popleft()] = gid

  def prefix_rows(self, engine, seqs):
    rows: dict[int, list[int]] = {}
    for j, s in enumerate(seqs):
      if s.group is not None:
        rows.setdefault(s.group, []).append(j)
    return [(r, self._shared(engine, g)[0]) for g, r in rows.items()]

  def prefilled(self, engine, seq) -> None:
    if isinstance(seq.idx, tuple):  # a group prefix: stored for later groups that share it
      engine.tree.insert(seq.req.prompt, engine.pool.table(seq.idx))

  def finished(self, engine, seq) -> None:
    gid = self.member_of.pop(seq.idx, None)
    if gid is None:
      return
    self.left[gid] -= 1
    if self.left[gid] == 0 and self.prefix[gid]:  # explicit release of the group's prefix
      engine.release(("prefix", gid))
      try:
        engine.tree.remove(self.prefix[gid])
      except KeyError:  # no longer a stored path of its own (split by a longer prefix)
        pass
