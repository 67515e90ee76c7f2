"""The training loop: AdamW + warmup/cosine, a jit step under a device mesh, eval, checkpoints.

    python -m experiments train quickstart
    python -m experiments train quickstart steps=2000 model.chains=[1,1]

A run folder holds config.yaml, tokenizer.json, checkpoints/, metrics.jsonl, TensorBoard events
and loss.png. Running the same config again resumes from the newest checkpoint: batches depend
only on (seed, step), so the resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from colm.colm import cross_entropy, freeze, multiscale_loss, multiscale_losses, trainable_mask
from colm.config import ModelConfig
from colm.mesh import batch_sharding, make_mesh, param_sharding, tree_shardings  # noqa: F401
from colm.model import Decoder
from colm.params import ParamCodec, Params
from experiments.checkpoint import CheckpointError, Checkpoints
from experiments.config import ConfigError, TrainConfig, config_diff, to_yaml
from experiments.divergence import (
  Divergence,
  Guard,
  init_guard,
  make_guarded_step,
  rollback_target,
  what_failed,
)


class TrainingDiverged(RuntimeError):
  """A step's loss or gradient norm was not finite, or the loss spiked; its update was not
  applied (experiments.divergence)."""


# ---------------------------------------------------------------------------------------------
# Pieces a notebook can use on their own (make_mesh and param_sharding now live in colm.mesh
# and are imported here for old callers).


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up from 0 to cfg.lr, then cosine decay to lr * min_lr_ratio at cfg.steps.

  The schedule is read at the update's count, 0 for step 1: with warm-up, step 1 has lr 0;
  warmup_steps=0 starts at cfg.lr (what a test of the first update needs).
  """
  if cfg.warmup_steps == 0:
    return optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=cfg.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, cfg.warmup_steps, cfg.steps, end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig, model_cfg: ModelConfig | None = None
                   ) -> optax.GradientTransformation:
  """AdamW on lr_schedule; weight decay only on matrices; global-norm clipping; with
  cfg.freeze_chains, the old chains' entries get neither gradient nor update (colm.colm.freeze)."""
  tx = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                   weight_decay=cfg.weight_decay,
                   mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  if cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  if cfg.freeze_chains:
    tx = freeze(tx, trainable_mask(model_cfg or cfg.model_config(), cfg.freeze_chains))
  return tx


def make_loss_fn(codec: ParamCodec, num_chains: int | None = None,
                 scale_weights: list[float] | None = None) -> Callable:
  def loss_fn(params: Params, batch: jax.Array) -> jax.Array:
    """batch: [B, T+1] int tokens; predicts tokens 1..T from 0..T-1. With scale_weights, the
    CoLM multi-scale loss sum_k w_k CE(chains 1..k) from one forward."""
    model = codec.merge(params)
    if scale_weights:
      return multiscale_loss(model, batch, scale_weights)
    logits = model(batch[:, :-1], num_chains=num_chains, logits_dtype=model.cfg.dtype)
    return cross_entropy(logits, batch[:, 1:])
  return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}
  return train_step


@dataclasses.dataclass
class TrainState:
  """What a run carries between steps (and what a checkpoint holds)."""

  step: int
  params: Params
  opt_state: Any
  guard: Guard | None = None  # divergence check state (experiments.divergence); None: fresh
  lr_scale: float = 1.0  # learning-rate multiplier (lowered by each rollback)
  batch_offset: int = 0  # step s reads batch s + batch_offset (rollbacks skip batches)
  rollbacks: int = 0

  def meta(self) -> dict[str, Any]:
    """What a checkpoint stores besides the arrays, so a resumed run continues exactly."""
    g = self.guard or init_guard()
    return {"step": self.step, "lr_scale": self.lr_scale, "batch_offset": self.batch_offset,
            "rollbacks": self.rollbacks, "loss_ema": float(g["ema"]), "loss_count": int(g["count"])}

  @classmethod
  def from_checkpoint(cls, step: int, state: dict[str, Any], meta: dict[str, Any]) -> TrainState:
    return cls(step, state["params"], state["opt_state"],
               init_guard(meta.get("loss_ema", 0.0), meta.get("loss_count", 0)),
               meta.get("lr_scale", 1.0), meta.get("batch_offset", 0), meta.get("rollbacks", 0))


class Trainer:
  """Builds model, optimizer and jitted steps for a config on a mesh; `train` runs the loop."""

  def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig | None = None,
               mesh: Mesh | None = None):
    self.cfg = cfg
    self.model_cfg = model_cfg or cfg.model_config()
    self.mesh = mesh or make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    n_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if cfg.batch_size % n_shards:
      raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {n_shards} "
                       "data-parallel shards of the mesh")
    model = nnx.eval_shape(lambda: Decoder(self.model_cfg, rngs=nnx.Rngs(cfg.seed)))
    self.codec = ParamCodec(model)
    self.tx = make_optimizer(cfg, self.model_cfg)
    abstract = self.codec.params(model)
    self.param_shardings = tree_shardings(abstract, self.mesh)
    self.batch_sharding = batch_sharding(self.mesh)
    self.loss_fn = make_loss_fn(self.codec, scale_weights=cfg.scale_weights)
    self._step = jax.jit(make_guarded_step(self.loss_fn, self.tx, cfg.divergence_spike,
                                           cfg.divergence_window), donate_argnums=(0, 1, 2))
    self._init = None
    self._replicated = NamedSharding(self.mesh, P())
    # Validation: the cross-entropy of every chain scale from one forward (the last is the model).
    self._eval = jax.jit(lambda params, batch: multiscale_losses(self.codec.merge(params), batch))

  def init_state(self, params: Params | None = None) -> TrainState:
    """Fresh parameters (seeded), or the given ones (e.g. an expanded model), and a fresh
    optimizer state, placed with their shardings."""
    if params is not None:
      params = jax.device_put(dict(params), self.param_shardings)
      opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings(
          jax.eval_shape(self.tx.init, params)))(params)
      return TrainState(0, params, opt_state)

    if self._init is None:  # compiled once (a rollback to step 0 initialises again)
      def init():
        params = self.codec.params(Decoder(self.model_cfg, rngs=nnx.Rngs(self.cfg.seed)))
        return params, self.tx.init(params)
      abstract_p, abstract_o = jax.eval_shape(init)
      opt_shardings = self._opt_shardings(abstract_o)
      self._init = jax.jit(init, out_shardings=(self.param_shardings, opt_shardings))
    params, opt_state = self._init()
    return TrainState(0, params, opt_state)

  def _opt_shardings(self, abstract_opt):
    # Optimizer moments mirror the params; scalars (counts) are replicated.
    return tree_shardings(abstract_opt, self.mesh)

  def abstract_state(self) -> dict[str, Any]:
    def init():
      params = self.codec.params(Decoder(self.model_cfg, rngs=nnx.Rngs(0)))
      return {"params": params, "opt_state": self.tx.init(params)}
    shapes = jax.eval_shape(init)
    shardings = {"params": self.param_shardings,
                 "opt_state": self._opt_shardings(shapes["opt_state"])}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)

  @property
  def local_rows(self) -> slice:
    """The rows of the global batch this process's devices hold (all of them in one process):
    what it loads and feeds; processes' row ranges are disjoint unless a batch shard spans
    several processes."""
    b = self.cfg.batch_size
    idx = self.batch_sharding.addressable_devices_indices_map((b, self.cfg.seq_len + 1))
    starts = [i[0].start or 0 for i in idx.values()]
    stops = [b if i[0].stop is None else i[0].stop for i in idx.values()]
    return slice(min(starts), max(stops))

  def put_batch(self, batch: np.ndarray) -> jax.Array:
    """A batch [B, T+1] onto the mesh, batch axis over ('data', 'fsdp').

    batch: the global batch, or (several processes) only this process's `local_rows` of it,
    as jax.make_array_from_process_local_data expects.
    """
    batch = np.asarray(batch, np.int32)
    if jax.process_count() == 1:
      return jax.device_put(batch, self.batch_sharding)
    rows = self.local_rows
    shape = (self.cfg.batch_size,) + batch.shape[1:]
    if batch.shape[0] == shape[0] and rows.stop - rows.start != shape[0]:
      batch = batch[rows]
    return jax.make_array_from_process_local_data(self.batch_sharding, batch, shape)

  def load_batch(self, data, split: str, step: int) -> np.ndarray:
    """This process's rows (local_rows) of the global batch of (split, step): each process reads
    only its own shard of the data."""
    cfg = self.cfg
    return data.batch(split, step, cfg.batch_size, cfg.seq_len, cfg.seed, rows=self.local_rows)

  def step(self, state: TrainState, batch: np.ndarray) -> tuple[TrainState, dict]:
    """One guarded step: metrics["ok"] False means the update was not applied (and no later
    one will be until the guard is reset)."""
    # Placed like the step's outputs, so a fresh or restored guard does not recompile the step.
    guard = jax.device_put(init_guard() if state.guard is None else state.guard,
                           self._replicated)
    with jax.set_mesh(self.mesh):
      params, opt_state, guard, metrics = self._step(
          state.params, state.opt_state, guard, self.put_batch(batch),
          np.float32(state.lr_scale))
    return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state,
                               guard=guard), metrics

  def eval_loss(self, params: Params, batch: np.ndarray) -> jax.Array:
    return self.eval_scale_losses(params, batch)[-1]

  def eval_scale_losses(self, params: Params, batch: np.ndarray) -> jax.Array:
    """[num_chains] validation cross-entropy of chains 1..k for k = 1..n."""
    with jax.set_mesh(self.mesh):
      return self._eval(params, self.put_batch(batch))

  def model(self, params: Params) -> Decoder:
    return self.codec.merge(params)


# ---------------------------------------------------------------------------------------------
# The run.


def _is_main() -> bool:
  return jax.process_index() == 0


class _Logger:
  """metrics.jsonl plus TensorBoard (if tensorboardX imports), written by process 0 only."""

  def __init__(self, run_dir: Path, resume_step: int):
    self.path = run_dir / "metrics.jsonl"
    self.tb = None
    if not _is_main():
      return
    if self.path.exists():  # drop rows past the checkpoint we resume from
      rows = [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]
      keep = [r for r in rows if r.get("step", 0) <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)
    except ImportError:
      pass

  def log(self, row: dict) -> None:
    if not _is_main():
      return
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, row["step"])

  def close(self):
    if self.tb is not None:
      self.tb.close()


def plot_losses(run_dir: Path) -> Path | None:
  """loss.png from metrics.jsonl: train loss and validation loss against step."""
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if tr:
    ax.plot(*zip(*tr), label="train")
  if va:
    ax.plot(*zip(*va), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(run_dir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out = run_dir / "loss.png"
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def prepare_data(cfg: TrainConfig, progress: bool = True):
  """The run's Dataset; ConfigError when a split is too short for one batch (before any step
  and before the run folder is created)."""
  from experiments.data import DataConfig, prepare
  d = cfg.data
  data = prepare(DataConfig(source=d.source, vocab_size=cfg.model_config().vocab_size,
                            val_fraction=d.val_fraction, max_bytes=d.max_bytes,
                            cache_dir=d.cache_dir, tokenizer=d.tokenizer), progress=progress)
  for split in ("train", "val"):
    n = data.tokens(split).shape[0]
    if n < cfg.seq_len + 1:
      raise ConfigError(f"data.source: the {split} split of {d.source} has {n} tokens, fewer "
                        f"than seq_len + 1 = {cfg.seq_len + 1}; use a bigger corpus (or "
                        "data.val_fraction) or a shorter seq_len")
  return data


def evaluate(trainer: Trainer, params: Params, data, batches: int, step_offset: int = 0,
             per_scale: bool = False):
  """Mean validation loss over `batches` fixed batches (the same ones at every evaluation);
  per_scale: a [num_chains] array, the loss of chains 1..k for each scale k."""
  losses = [trainer.eval_scale_losses(params, trainer.load_batch(data, "val", step_offset + i))
            for i in range(batches)]
  mean = np.mean(np.stack([np.asarray(x, np.float64) for x in losses]), axis=0)
  return mean if per_scale else float(mean[-1])


def check_run_config(run_dir: Path, cfg: TrainConfig) -> list[str]:
  """A run folder may only be resumed with the same model: a different one is an error naming
  each differing key. Returns the other differences (lr, steps ...), which a resume takes."""
  saved = run_dir / "config.yaml"
  if not saved.exists():
    return []
  from experiments.config import load_config
  old = load_config(saved)
  diff = config_diff(old, cfg)
  model = [d for d in diff if d.startswith("model.")]
  if model:
    raise CheckpointError(f"{run_dir} holds a run of a different model configuration "
                          f"({'; '.join(model)}); choose another name= or delete the folder")
  return diff


def last_val_loss(run_dir: Path) -> float | None:
  """The newest val_loss in a run's metrics.jsonl (a finished run evaluates nothing again)."""
  path = Path(run_dir) / "metrics.jsonl"
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] \
      if path.exists() else []
  vals = [r["val_loss"] for r in rows if "val_loss" in r]
  return vals[-1] if vals else None


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True,
          data=None, init_params: Params | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run described by cfg.

  Args:
    cfg: the run configuration; one with `stages` runs the progressive schedule
      (experiments/progressive.py).
    stop_after: stop once this step is reached (after saving), as if the run were killed there.
    progress: show a tqdm progress bar.
    data: a prepared experiments.data.Dataset (built from cfg.data when None).
    init_params: start from these parameters instead of a fresh init (ignored on resume).
  Returns:
    {"step", "val_loss", "run_dir", ...} of the last evaluation (a finished run: its last one).
  Raises:
    TrainingDiverged: a step failed the divergence check (cfg.on_divergence='stop', or every
      rollback was used); its pre-update state is saved as a checkpoint first.
  """
  if cfg.stages:
    from experiments.progressive import train_progressive
    return train_progressive(cfg, stop_after=stop_after, progress=progress, data=data)
  run_dir = Path(cfg.out_dir) / cfg.name
  changed = check_run_config(run_dir, cfg)
  trainer = Trainer(cfg)
  data = data or prepare_data(cfg, progress)
  if _is_main():
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data.tokenizer.save(str(run_dir / "tokenizer.json"))
  ckpt = Checkpoints(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
  if ckpt.latest_step() is not None:
    step, restored, meta = ckpt.restore_newest(trainer.abstract_state())
    state = TrainState.from_checkpoint(step, restored, meta)
    print(f"resuming {run_dir} from step {step}"
          + (f" with changed settings: {'; '.join(changed)}" if changed else ""))
  else:
    state = trainer.init_state(init_params)
  log = _Logger(run_dir, state.step)
  mc = trainer.model_cfg
  rows = trainer.local_rows
  print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"(process {jax.process_index()} of {jax.process_count()}, feeding rows "
        f"{rows.start}:{rows.stop} of each batch), mesh {dict(trainer.mesh.shape)}; "
        f"model {mc.num_params() / 1e6:.2f}M params, chains={mc.chains}")
  tokens_per_step = cfg.batch_size * cfg.seq_len
  flops_per_step = mc.flops_per_token(cfg.seq_len) * tokens_per_step
  on_gpu = jax.default_backend() == "gpu"

  from tqdm.auto import tqdm
  bar = tqdm(total=cfg.steps, initial=state.step, disable=not (progress and _is_main()),
             unit="step", dynamic_ncols=True)
  pending: list[tuple[int, dict]] = []
  t_start = time.time()
  t_last, step_last = time.time(), state.step
  result: dict[str, Any] = {"run_dir": str(run_dir)}
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  last_target = None  # the previous rollback's checkpoint, until a newer one is saved

  def save(st: TrainState, **extra) -> None:
    ckpt.save(st.step, {"params": st.params, "opt_state": st.opt_state},
              {**st.meta(), "model": dataclasses.asdict(mc), **extra})

  def flush():
    """Fetches pending step metrics (one host sync), checks them, logs them; raises Divergence
    at the first step whose update was not applied."""
    nonlocal t_last, step_last
    if not pending:
      return
    rows = [(s, {k: float(v) for k, v in m.items()}) for s, m in pending]
    pending.clear()
    bad = next(((s, m) for s, m in rows if not m["ok"]), None)
    rows = [(s, m) for s, m in rows if m["ok"]]
    now = time.time()
    tok_s = len(rows) * tokens_per_step / max(now - t_last, 1e-9)
    t_last, step_last = now, state.step
    if rows:
      s, m = rows[-1]
      row = {"step": s, "loss": m["loss"], "grad_norm": m["grad_norm"],
             "lr": float(lr_schedule(cfg)(s - 1)) * state.lr_scale,
             "tokens_per_s": tok_s, "elapsed_s": now - t_start}
      if on_gpu:
        row["mfu"] = tok_s / tokens_per_step * flops_per_step / (cfg.peak_tflops * 1e12)
      log.log(row)
      bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
    if bad is not None:
      raise Divergence(bad[0], what_failed(bad[1], cfg.divergence_spike))

  def diverged(d: Divergence) -> TrainState:
    """The state to continue from after a failed step (rollback), or raises TrainingDiverged."""
    nonlocal last_target
    # The guard skipped every update from the failed step on: state holds the state before it.
    pre = dataclasses.replace(state, step=d.step - 1, guard=dict(state.guard, ok=np.True_))
    if cfg.on_divergence == "rollback" and state.rollbacks < cfg.max_rollbacks:
      target = rollback_target(ckpt.verified_steps(), d.step, last_target)
      for s in ckpt.all_steps():  # the diverging trajectory's checkpoints are dropped
        if s > target:
          ckpt.manager.delete(s)
      if target > 0:
        st = TrainState.from_checkpoint(*ckpt.restore(trainer.abstract_state(), target))
      else:
        st = dataclasses.replace(trainer.init_state(init_params), batch_offset=state.batch_offset,
                                 lr_scale=state.lr_scale, rollbacks=state.rollbacks)
      skip = d.step - target  # the batches that led to the divergence
      st = dataclasses.replace(st, lr_scale=state.lr_scale * cfg.rollback_lr_factor,
                               batch_offset=state.batch_offset + skip,
                               rollbacks=state.rollbacks + 1)
      last_target = target
      msg = (f"divergence at {d}; rolled back to step {target}, learning rate x "
             f"{st.lr_scale:g}, skipping {skip} batches (rollback {st.rollbacks} of "
             f"{cfg.max_rollbacks})")
      bar.write(msg)
      log.log({"step": target, "rollback": st.rollbacks, "diverged_at": d.step,
               "lr_scale": st.lr_scale})
      bar.n = target
      return st
    save(pre, diverged_at=d.step)
    tried = f" after {state.rollbacks} rollbacks" if state.rollbacks else ""
    raise TrainingDiverged(
        f"divergence at {d}; stopped{tried} before applying its update. The newest checkpoint "
        f"that is finite and passed the check is step {pre.step} in {ckpt.directory} (the state "
        f"before step {d.step}): resume with a lower lr (now {cfg.lr * state.lr_scale:g}) or "
        "with on_divergence=rollback")

  try:
    while state.step < end:
      try:
        batch = trainer.load_batch(data, "train", state.step + state.batch_offset)
        state, metrics = trainer.step(state, batch)
        pending.append((state.step, metrics))
        bar.update(1)
        out_of_time = cfg.max_minutes and (time.time() - t_start) > 60 * cfg.max_minutes
        last = state.step == end or out_of_time
        if state.step % cfg.log_every == 0 or last:
          flush()
        if state.step % cfg.eval_every == 0 or last:
          flush()
          vals = evaluate(trainer, state.params, data, cfg.eval_batches, per_scale=True)
          val = float(vals[-1])
          row = {"step": state.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))}
          if len(vals) > 1:  # CoLM: every nested sub-model's loss (chains 1..k)
            row["val_loss_scales"] = [float(v) for v in vals]
          log.log(row)
          result.update(step=state.step, val_loss=val)
          bar.write(f"step {state.step}: val loss {val:.4f}")
        if state.step % cfg.save_every == 0 or last:
          flush()
          save(state)
          last_target = None
      except Divergence as d:
        pending.clear()
        state = diverged(d)
        continue
      if out_of_time and not state.step == end:
        bar.write(f"max_minutes={cfg.max_minutes} reached at step {state.step}; stopping "
                  "(run again to resume)")
        break
  finally:
    bar.close()
    log.close()
    ckpt.close()
  if _is_main():
    plot_losses(run_dir)
  if "val_loss" not in result:  # resumed at the run's end: nothing ran, report the last one
    result["val_loss"] = last_val_loss(run_dir)
  result["step"] = state.step
  result["params"] = state.params
  result["trainer"] = trainer
  result["data"] = data
  return result


def load_run(run_dir: str | Path, step: int | None = None):
  """Loads a run folder: (TrainConfig, Decoder with restored params, tokenizers.Tokenizer, step).

  Raises CheckpointError for a missing folder, config, tokenizer or checkpoint.
  """
  from experiments.config import load_config
  from experiments.data import load_tokenizer
  run_dir = Path(run_dir)
  if not (run_dir / "config.yaml").is_file():
    raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
  cfg = load_config(run_dir / "config.yaml")
  if cfg.stages:  # a progressive run: its last stage holds the final model
    return load_run(run_dir / f"stage{len(cfg.stages) - 1}", step)
  if not (run_dir / "tokenizer.json").is_file():
    raise CheckpointError(f"{run_dir} has no tokenizer.json")
  trainer = Trainer(cfg, mesh=make_mesh(-1, 1))
  ckpt = Checkpoints(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
  try:
    step, state, _ = ckpt.restore_newest(trainer.abstract_state(), step)
  finally:
    ckpt.close()
  tok = load_tokenizer(run_dir / "tokenizer.json", strict=cfg.data.tokenizer is None)
  return cfg, trainer.model(state["params"]), tok, step
