"""Divergence found before it does damage: a guarded train step and the rollback rule.

The guarded step computes the loss and gradients, then applies the update only when the loss
and the gradient norm are finite, the loss is not a spike (above `spike` x its recent average)
and the new parameters are finite. The flag is sticky: once a step fails, every later step of
the same dispatch queue is a no-op, so the state the host finds at its next sync is exactly the
state before the first failing step. Rollback (PaLM, section 5.1: restart from a checkpoint
before the spike, skip the batches that led to it) lives in the training loop; `rollback_target`
picks the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Guard = dict[str, jax.Array]  # {"ok": bool [], "ema": f32 [], "count": i32 []}


class Divergence(Exception):
  """Raised inside the loop at the host sync that found a failed step (handled there)."""

  def __init__(self, step: int, what: str):
    super().__init__(f"step {step}: {what}")
    self.step, self.what = step, what


def init_guard(ema: float = 0.0, count: int = 0) -> Guard:
  return {"ok": jnp.asarray(True), "ema": jnp.asarray(ema, jnp.float32),
          "count": jnp.asarray(count, jnp.int32)}


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_guarded_step(loss_fn: Callable, tx: optax.GradientTransformation, spike: float,
                      window: int) -> Callable:
  """(params, opt_state, guard, batch [B, T+1], lr_scale f32 []) -> (params, opt_state, guard,
  metrics); updates are multiplied by lr_scale (AdamW's update, decay included, is linear in
  the learning rate), so a rollback lowers it without recompiling."""
  decay = 1.0 - 1.0 / window

  def step(params, opt_state, guard, batch, lr_scale):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    gnorm = optax.global_norm(grads)
    count = guard["count"]
    avg = guard["ema"] / jnp.maximum(1.0 - decay ** count.astype(jnp.float32), 1e-12)
    is_spike = (spike > 0) & (count >= window) & (loss > spike * avg)
    updates, new_opt = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    ok = guard["ok"] & finite & ~is_spike & _all_finite(new_params)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt, opt_state)
    guard = {"ok": ok, "ema": jnp.where(ok, decay * guard["ema"] + (1 - decay) * loss,
                                        guard["ema"]),
             "count": jnp.where(ok, count + 1, count)}
    return params, opt_state, guard, {"loss": loss, "grad_norm": gnorm, "ok": ok,
                                      "spike": is_spike, "loss_avg": avg}
  return step


def what_failed(m: dict[str, float], spike: float) -> str:
  """A few words for a failed step's host metrics (floats)."""
  import math
  if not math.isfinite(m["loss"]):
    return f"the loss is {m['loss']} (grad norm {m['grad_norm']:.4g})"
  if not math.isfinite(m["grad_norm"]):
    return f"the gradient norm is {m['grad_norm']} (loss {m['loss']:.4f})"
  if m["spike"]:
    return (f"the loss {m['loss']:.4f} is above {spike:g} x its recent average "
            f"{m['loss_avg']:.4f}")
  return f"the update made parameters non-finite (loss {m['loss']:.4f})"


def rollback_target(verified: list[int], diverged_at: int, previous: int | None) -> int:
  """The checkpoint to roll back to: the newest verified one before the failed step, and older
  than the previous rollback's target when no newer checkpoint was saved since (diverging again
  from the same place means the damage is older); 0 = a fresh initialisation."""
  limit = diverged_at if previous is None else min(diverged_at, previous)
  return max([s for s in verified if s < limit], default=0)
