"""The process reward model: the project's decoder with a value head, trained Math-Shepherd style.

Axes: B batch, T tokens, D hidden.

The trunk is a colm Decoder (initialised from the trained policy, `PRM.from_policy`); the head
is nnx.Linear(D, 1) on the trunk's final RMSNorm'd hidden states, so values(tokens)[b, t] is
the logit of "the solution up to token t is still on a path that reaches the answer". Training
(`prm_loss`) reads it only at step ends, the STEP tokens that close each step (labels: the step
checker's `StepCheck.reachable`, or rollout estimates: Math-Shepherd, Wang et al., arXiv
2312.08935, Sec. 3.3), and the search reads it at a path's last token (`score`).

    prm = PRM.from_policy(policy, step_token=nl, rngs=nnx.Rngs(1))
    loss = prm_loss(prm, tokens, tokens == nl, labels)          # binary CE at the step ends
    p = prm.score(tokens, lengths)                               # [B] in (0, 1)
    scorer = PRMScorer(prm)                                      # search.methods.Scorer
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from colm.config import ModelConfig, resolve_dtype
from colm.model import Decoder
from kvcache.paged import bucket


class PRM(nnx.Module):
  """A Decoder trunk plus a scalar value head.

  Args:
    cfg: the trunk's model configuration.
    step_token: the id of the step separator (experiments.reasoning.step_token_id); `embed`
      finds the last step by it.
    rngs: initialisation keys (trunk, then head).
  """

  def __init__(self, cfg: ModelConfig, *, step_token: int, rngs: nnx.Rngs):
    self.trunk = Decoder(cfg, rngs=rngs)
    # float32 head on float32 features; a small normal kernel and a zero bias start every value
    # near logit 0 (probability 0.5).
    self.value_head = nnx.Linear(
        cfg.d_model, 1, rngs=rngs, dtype=jnp.float32, param_dtype=resolve_dtype(cfg.param_dtype),
        kernel_init=nnx.initializers.normal(cfg.init_std), bias_init=nnx.initializers.zeros)
    self.step_token = int(step_token)

  @classmethod
  def from_policy(cls, policy: Decoder, *, step_token: int, rngs: nnx.Rngs) -> PRM:
    """A PRM whose trunk is a copy of the policy's weights (the head freshly initialised)."""
    prm = cls(policy.cfg, step_token=step_token, rngs=rngs)
    nnx.update(prm.trunk, jax.tree.map(jnp.copy, nnx.state(policy)))
    return prm

  @property
  def cfg(self) -> ModelConfig:
    return self.trunk.cfg

  def features(self, tokens: jax.Array) -> jax.Array:
    """What the head reads: the trunk's final-norm hidden states, [B, T] int -> [B, T, D] f32."""
    h = self.trunk.hidden(tokens)
    return self.trunk.final_norm(h, self.cfg.num_chains).astype(jnp.float32)

  def values(self, tokens: jax.Array) -> jax.Array:
    """Logits of "still on the way to the answer" at every position: [B, T] -> [B, T] f32."""
    return self.value_head(self.features(tokens))[..., 0]

  def score(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """sigmoid(value) at each sequence's last real token: tokens [B, T] right-padded, lengths
    [B] int (1 <= lengths <= T) -> [B] f32 in (0, 1). Causal, so the padding does not matter."""
    return self._score_of(self.features(tokens), lengths)

  def _score_of(self, f: jax.Array, lengths: jax.Array) -> jax.Array:
    last = jnp.clip(lengths - 1, 0, f.shape[1] - 1)
    feat = jnp.take_along_axis(f, last[:, None, None], axis=1)  # [B, 1, D]
    return jax.nn.sigmoid(self.value_head(feat)[:, 0, 0])

  def score_embed(self, tokens: jax.Array, lengths: jax.Array, step_lengths: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """(score, embed) from one trunk pass: [B] f32 and [B, D] f32 (ETS needs both per step)."""
    f = self.features(tokens)
    return self._score_of(f, lengths), self._embed_of(f, tokens, lengths, step_lengths)

  def embed(self, tokens: jax.Array, lengths: jax.Array,
            step_lengths: jax.Array | None = None) -> jax.Array:
    """The last step's embedding: the mean of `features` over its tokens, [B, D] f32.

    ETS clusters these by cosine distance (search.cluster) to count how many distinct steps the
    kept leaves cover. The last step spans the tokens after the last STEP token before the
    final token, through the final token (its own closing STEP included); with step_lengths
    [B] int, it is the last step_lengths[b] tokens instead.

    Args:
      tokens: [B, T] int, right-padded.
      lengths: [B] int real tokens per row (>= 1).
      step_lengths: optional [B] int (>= 1) tokens of the last step.
    """
    return self._embed_of(self.features(tokens), tokens, lengths, step_lengths)

  def _embed_of(self, f, tokens, lengths, step_lengths=None) -> jax.Array:
    t = tokens.shape[1]
    pos = jnp.arange(t)[None]  # [1, T]
    if step_lengths is None:
      inner = (tokens == self.step_token) & (pos < lengths[:, None] - 1)
      start = jnp.max(jnp.where(inner, pos, -1), axis=1) + 1  # [B]
    else:
      start = jnp.maximum(lengths - step_lengths, 0)
    mask = ((pos >= start[:, None]) & (pos < lengths[:, None])).astype(jnp.float32)  # [B, T]
    return jnp.einsum("btd,bt->bd", f, mask) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)


def prm_loss(prm: PRM, tokens: jax.Array, step_end_mask: jax.Array, labels: jax.Array
             ) -> jax.Array:
  """Binary cross-entropy of the values at the step ends, averaged over them.

  Args:
    prm: the model.
    tokens: [B, T] int (right-padded).
    step_end_mask: [B, T] bool, the positions that carry a label (the STEP tokens closing each
      step; padding and prompt positions False).
    labels: [B, T] float targets in [0, 1] (hard checker labels, or soft rollout estimates).
  Returns:
    the scalar mean loss (0 when the mask is empty).
  """
  logits = prm.values(tokens)
  bce = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
  m = step_end_mask.astype(jnp.float32)
  return jnp.sum(bce * m) / jnp.maximum(jnp.sum(m), 1.0)


# --------------------------------------------------------------------------------------------------
# The search's view (search.methods.Scorer): token lists in, numpy out, few compiled shapes.


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, tokens, lengths):
  return nnx.merge(graphdef, state).score(tokens, lengths)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens, lengths, step_lengths):
  return nnx.merge(graphdef, state).embed(tokens, lengths, step_lengths)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_embed(graphdef, state, tokens, lengths, step_lengths):
  return nnx.merge(graphdef, state).score_embed(tokens, lengths, step_lengths)


class PRMScorer:
  """search.methods.Scorer over a PRM: paths are padded to power-of-two batch sizes and to a
  multiple of pad_to tokens, so a search compiles a handful of shapes."""

  def __init__(self, prm: PRM, pad_to: int = 32):
    self.graphdef, self.state = nnx.split(prm)
    self.pad_to = pad_to

  def _pad(self, paths: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    if not paths or any(len(p) == 0 for p in paths):
      raise ValueError("every path needs at least one token")
    t = -(-max(len(p) for p in paths) // self.pad_to) * self.pad_to
    tokens = np.zeros((bucket(len(paths)), t), np.int32)
    lengths = np.ones(tokens.shape[0], np.int32)
    for i, p in enumerate(paths):
      tokens[i, :len(p)] = p
      lengths[i] = len(p)
    return tokens, lengths

  def score(self, paths: Sequence[Sequence[int]]) -> np.ndarray:
    """[n] float32 sigmoid values at each path's last token."""
    tokens, lengths = self._pad(paths)
    return np.asarray(_score(self.graphdef, self.state, tokens, lengths))[:len(paths)]

  def _pad_steps(self, paths, step_lengths):
    tokens, lengths = self._pad(paths)
    sl = np.ones_like(lengths)
    sl[:len(paths)] = np.asarray(step_lengths, np.int32)
    return tokens, lengths, sl

  def embed(self, paths: Sequence[Sequence[int]], step_lengths: Sequence[int]) -> np.ndarray:
    """[n, D] float32 mean features over each path's last step_lengths[i] tokens."""
    out = _embed(self.graphdef, self.state, *self._pad_steps(paths, step_lengths))
    return np.asarray(out)[:len(paths)]

  def score_embed(self, paths: Sequence[Sequence[int]], step_lengths: Sequence[int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(score(paths), embed(paths, step_lengths)) from one forward pass."""
    s, e = _score_embed(self.graphdef, self.state, *self._pad_steps(paths, step_lengths))
    return np.asarray(s)[:len(paths)], np.asarray(e)[:len(paths)]
