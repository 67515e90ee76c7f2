"""WindowKV (Zuo et al., arXiv 2503.17922): task-adaptive selection of windows of tokens.

Symbols of the paper:
  alpha   the observation window (the last alpha prompt queries score the cache);
  t_j     token j's score: its attention summed over the window's queries (and the group's query
          heads);
  omega   the window size: the cache is cut into windows of omega consecutive tokens, and whole
          windows are kept, so that a kept fact keeps its context;
  s_w     a window's score from its tokens' t_j: "max" (localization tasks: the mean of the top
          p = omega / 2 token scores, a window with one strong hit ranks high) or "average"
          (aggregation tasks: the mean of all omega);
  gamma   index sharing: layers are taken in groups of gamma and the group's first layer
          selects the windows for all of them;
  lambda  the budget pyramid over the groups: budgets fall arithmetically, the last group's
          1 / lambda of the mean (lambda = 14).
The task type picks the window score and alpha: localization -> "max", alpha 32; aggregation ->
"average", alpha 16 (`WindowKV.for_task`). Windows are taken in slot order, which after a
prefill is position order.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvcache.press import Press, arithmetic_budgets, attention_sum, window_mask

TASKS = {"localization": ("max", 32), "aggregation": ("average", 16)}


@dataclasses.dataclass(frozen=True)
class WindowKV(Press):
  """Attributes: score 'max' or 'average' (s_w), omega, gamma, lam (lambda); window is alpha."""

  window: int = 32
  score: str = "max"
  omega: int = 8
  gamma: int = 4
  lam: float = 14.0

  def __post_init__(self):
    super().__post_init__()
    if self.score not in ("max", "average"):
      raise ValueError(f"WindowKV score must be 'max' or 'average', got {self.score!r}")
    if self.omega < 1 or self.gamma < 1:
      raise ValueError(f"omega and gamma must be >= 1, got {self.omega}, {self.gamma}")

  @classmethod
  def for_task(cls, task: str, budget, **kw) -> WindowKV:
    """The paper's switch: task 'localization' or 'aggregation' -> (score, alpha)."""
    if task not in TASKS:
      raise ValueError(f"unknown task type {task!r}; known: {sorted(TASKS)}")
    score, alpha = TASKS[task]
    return cls(budget, window=alpha, score=score, **kw)

  def layer_budgets(self, n_layers, n_kv_heads, prompt):
    groups = -(-n_layers // self.gamma)
    mean = self.tokens(prompt)
    per_group = arithmetic_budgets(mean * groups, groups, self.lam, self.window)
    return tuple((min(per_group[li // self.gamma], prompt),) * n_kv_heads
                 for li in range(n_layers))

  def source(self, layer):
    return layer - layer % self.gamma  # the group's first layer selects

  def importance(self, layer, probs, pos, lengths):
    return attention_sum(probs)  # t_j

  def select(self, layer, importance, pos, lengths, budgets):
    b, k, n = importance.shape
    w = self.omega
    nw = -(-n // w)
    occupied = pos >= 0
    obs = window_mask(pos, lengths, self.window)
    t = jnp.where(occupied & ~obs, importance, 0.0)
    t = jnp.pad(t, ((0, 0), (0, 0), (0, nw * w - n))).reshape(b, k, nw, w)
    if self.score == "max":  # the mean of the top p = omega / 2 token scores
      p = max(1, w // 2)
      s_w = jnp.mean(jnp.sort(t, axis=-1)[..., w - p:], axis=-1)
    else:
      s_w = jnp.mean(t, axis=-1)
    # Windows wholly inside the observation window or empty never compete.
    live = jnp.pad(occupied & ~obs, ((0, 0), (0, 0), (0, nw * w - n))).reshape(b, k, nw, w)
    s_w = jnp.where(jnp.any(live, axis=-1), s_w, -jnp.inf)
    order = jnp.argsort(-s_w, axis=-1, stable=True)  # windows best first (ties: earlier)
    rank = jnp.argsort(order, axis=-1)  # [B, K, nw]
    # Each head keeps its budget: the observation window, then whole windows best first (the
    # last one cut to what is left), counting only the slots a window adds.
    fill = occupied & ~obs
    fill_w = jnp.pad(fill, ((0, 0), (0, 0), (0, nw * w - n))).reshape(b, k, nw, w)
    counts = jnp.sum(fill_w, axis=-1)  # [B, K, nw] slots each window adds
    by_rank = jnp.take_along_axis(counts, order, axis=-1)
    start = jnp.take_along_axis(jnp.cumsum(by_rank, axis=-1) - by_rank, rank, axis=-1)
    within = jnp.cumsum(fill_w, axis=-1) - 1  # a slot's place among its window's added slots
    before = (start[..., None] + within).reshape(b, k, nw * w)[..., :n]
    room = jnp.asarray(budgets, jnp.int32)[None, :, None] - jnp.sum(obs, axis=-1, keepdims=True)
    return obs | (fill & (before < room))
