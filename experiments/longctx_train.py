"""Trains the decoder (dense attention) to solve the long-context suite with the full cache: the
model that the KV-compression comparisons (`python -m experiments bench press`) run on.

    python -m experiments.longctx_train --quick                # CPU: toy widths, short prompts
    python -m experiments.longctx_train                         # GPU: configs/longctx.yaml
    python -m experiments.longctx_train --max-minutes 6 steps=9000 lr=1e-3   # config overrides

Each step trains on a corpus batch (next-token loss) plus a task batch of suite training examples
(experiments.longctx.train_examples' split: 'train' files and seeds), the loss on the answer
tokens (Example.target) and the end-of-text token that follows them. The task batch's prompt
length cycles through --lengths, its rows scaled so that every step holds the same task tokens;
families are drawn uniformly per row. Worker processes draw and tokenize examples while the
model trains; when they fall behind, a step reuses examples drawn before (a replay buffer, so
the accelerator never waits): the share of fresh rows is recorded.

Every eval_every steps: the teacher-forced exact match of each family's target (every target
token the argmax) on the 'val' split at the longest length, and on a needle depth x length grid,
for the curve of accuracy against steps (small models learn retrieval late and abruptly).

Writes <run>/model-0000i.safetensors (bfloat16 shards, the model config in the first one's
metadata) and <run>/tokenizer.json (load with `load_model`), results/longctx_train_<backend>.json
and longctx_accuracy_<backend>.png.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import longctx
from experiments.results import RESULTS_DIR, write_results

TARGET_TOKENS = 64  # room after a prompt for its target (answers + full stop + end of text)
QUICK = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
         "model.ffn_dim=176", "model.vocab_size=1024", "model.max_seq_len=640",
         "model.dtype=float32", "seq_len=128", "batch_size=2", "steps=30", "warmup_steps=5",
         "eval_every=15", "data.max_bytes=3000000"]
QUICK_LENGTHS = (448, 512)
SHARD_BYTES = 15 << 20  # each file under the device tool's 16 MiB (a 13M bfloat16 model: 2 shards)


# --------------------------------------------------------------------------------------------------
# Examples as token rows (drawn in worker processes).

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, source: str) -> None:
  import tokenizers
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  _WORKER["tok"] = tokenizers.Tokenizer.from_str(tokenizer_json)
  _WORKER["source"] = source


def encode_example(tok, e: longctx.Example) -> tuple[np.ndarray, np.ndarray]:
  """(prompt ids, target ids + end of text) of an example under a tokenizers.Tokenizer."""
  from experiments.data import eot_token_id
  prompt = tok.encode(e.prompt(), add_special_tokens=False).ids
  target = tok.encode(e.target, add_special_tokens=False).ids + [eot_token_id(tok)]
  return np.asarray(prompt, np.int32), np.asarray(target[:TARGET_TOKENS], np.int32)


def _draw(job: tuple) -> list[tuple[str, int, np.ndarray, np.ndarray, float | None]]:
  """job (family, length, seed, n, split, depth[, generator kwargs]) -> n encoded examples."""
  family, length, seed, n, split, depth, *kw = job
  tok = _WORKER["tok"]
  exs = longctx.generate(family, n, length, seed=seed, tokenizer=tok, split=split, depth=depth,
                         source=_WORKER["source"], **(kw[0] if kw else {}))
  return [(e.family, length, *encode_example(tok, e), e.depth) for e in exs]


def rows(examples, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token rows [B, length + TARGET_TOKENS + 1] (prompt, target, pad) and loss weights [B, length
  + TARGET_TOKENS] on the positions that predict a target token."""
  n = length + TARGET_TOKENS + 1
  toks = np.full((len(examples), n), pad_id, np.int32)
  w = np.zeros((len(examples), n - 1), np.float32)
  for i, (prompt, target) in enumerate(examples):
    p = prompt[:length]
    toks[i, :len(p)] = p
    toks[i, len(p):len(p) + len(target)] = target
    w[i, len(p) - 1:len(p) - 1 + len(target)] = 1.0
  return toks, w


class ExampleStream:
  """Training examples drawn by spawned workers, per prompt length: fresh ones first, then a
  replay of earlier ones when the workers fall behind. gen_kwargs go to every generator call
  (e.g. needle's depth_range)."""

  def __init__(self, tokenizer_json: str, source: str, families, lengths, seed: int,
               workers: int, chunk: int = 8, keep: int = 20000, gen_kwargs: dict | None = None):
    self.families, self.lengths = list(families), list(lengths)
    ctx = multiprocessing.get_context("spawn")
    self.pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(tokenizer_json, source))
    self.fresh = {n: collections.deque() for n in self.lengths}
    self.seen = {n: [] for n in self.lengths}
    self.keep, self.chunk, self.seed = keep, chunk, seed
    self.lock = threading.Lock()
    self.stop = False
    self.error: BaseException | None = None
    self.n_fresh = self.n_reused = 0
    self.jobs = ((f, n, seed * 1_000_003 + i, chunk, "train", None, dict(gen_kwargs or {}))
                 for i in range(1 << 40) for n in self.lengths for f in self.families)
    self.thread = threading.Thread(target=self._feed, args=(2 * workers,), daemon=True)
    self.thread.start()

  def eval_set(self, jobs) -> list:
    return [x for res in self.pool.map(_draw, jobs) for x in res]

  def _feed(self, outstanding: int) -> None:
    try:
      pending = {self.pool.submit(_draw, next(self.jobs)) for _ in range(outstanding)}
      while pending and not self.stop:
        done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for fut in done:
          for _, n, prompt, target, _ in fut.result():
            with self.lock:
              self.fresh[n].append((prompt, target))
          if not self.stop:
            pending.add(self.pool.submit(_draw, next(self.jobs)))
    except BaseException as e:  # noqa: BLE001 - handed to the training loop by take()
      self.error = e

  def take(self, rng: np.random.Generator, length: int, b: int) -> list:
    while True:  # wait only until the first examples of this length exist
      if self.error is not None:
        raise RuntimeError(f"drawing training examples failed: {self.error}") from self.error
      with self.lock:
        if self.fresh[length] or self.seen[length]:
          break
      time.sleep(0.05)
    out = []
    with self.lock:
      seen, fresh = self.seen[length], self.fresh[length]
      while len(out) < b and fresh:
        x = fresh.popleft()
        out.append(x)
        if len(seen) < self.keep:
          seen.append(x)
        else:
          seen[int(rng.integers(self.keep))] = x
      self.n_fresh += len(out)
      while len(out) < b:
        out.append(seen[int(rng.integers(len(seen)))])
        self.n_reused += 1
    return out

  def close(self) -> None:
    self.stop = True
    self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Saving and loading the trained model.


def save_model(folder: Path, cfg, params: dict, tokenizer, info: dict | None = None) -> list[Path]:
  """bfloat16 safetensors shards of at most SHARD_BYTES (+ tokenizer.json); the model config
  (colm ModelConfig fields) and `info` in the first shard's metadata."""
  import dataclasses

  import ml_dtypes

  from experiments.safetensors_io import write_file
  folder.mkdir(parents=True, exist_ok=True)
  shards, size = [{}], 0
  for name in sorted(params):
    x = np.asarray(jax.device_get(params[name])).astype(ml_dtypes.bfloat16)
    if shards[-1] and size + x.nbytes > SHARD_BYTES:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  meta = {"model_config": json.dumps(dataclasses.asdict(cfg)), "info": json.dumps(info or {}),
          "shards": str(len(shards))}
  paths = []
  for i, shard in enumerate(shards):
    paths.append(folder / f"model-{i:05d}.safetensors")
    write_file(paths[-1], shard, meta if i == 0 else None)
  tokenizer.save(str(folder / "tokenizer.json"))
  return paths


def load_model(folder: str | Path, dtype: str | None = None, **overrides):
  """(Decoder, tokenizers.Tokenizer, info) from save_model's folder; overrides replace model
  config fields (max_seq_len=32768 for long-prompt speed runs, say)."""
  from flax import nnx

  from colm.config import ModelConfig
  from colm.model import Decoder
  from colm.params import ParamCodec
  from experiments.data import load_tokenizer
  from experiments.safetensors_io import read_header, read_metadata, read_tensor
  folder = Path(folder)
  first = folder / "model-00000.safetensors"
  if not first.is_file():
    raise FileNotFoundError(f"{folder} holds no model-00000.safetensors (train one with "
                            f"python -m experiments.longctx_train)")
  meta = read_metadata(first)
  fields = json.loads(meta["model_config"])
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  if dtype:
    fields.update(dtype=dtype, param_dtype=dtype)
  cfg = ModelConfig(**{**fields, **overrides})
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  params = {}
  for i in range(int(meta["shards"])):
    path = folder / f"model-{i:05d}.safetensors"
    h, off = read_header(path)
    for name in h:
      params[name] = jnp.asarray(read_tensor(path, name, h, off), cfg.param_dtype)
  missing = set(codec.names) - set(params)
  if missing:
    raise KeyError(f"{folder}: parameters missing: {sorted(missing)[:5]}")
  tok = load_tokenizer(folder / "tokenizer.json", strict=False)
  return codec.merge(params), tok, json.loads(meta.get("info", "{}"))


# --------------------------------------------------------------------------------------------------
# Training.


def _ce(logits, targets, weights=None):
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  if weights is None:
    return jnp.mean(nll)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def argmax_predictor(codec) -> Callable:
  """jit(params, tokens int32 [B, T]) -> the model's argmax next token at every position [B, T]."""
  return jax.jit(lambda p, x: jnp.argmax(codec.merge(p)(x), -1))


def exact_match(predict, examples, length: int, pad_id: int, batch: int) -> np.ndarray:
  """bool per example: every target token is the argmax (teacher forcing)."""
  out = []
  for i in range(0, len(examples), batch):
    chunk = examples[i:i + batch]
    toks, w = rows([(p, t) for p, t in chunk], length, pad_id)
    n = len(chunk)
    if n < batch:  # one shape per length
      toks = np.concatenate([toks, np.repeat(toks[-1:], batch - n, 0)])
      w = np.concatenate([w, np.repeat(w[-1:], batch - n, 0)])
    pred = np.asarray(predict(toks[:, :-1]))
    ok = np.all((pred == toks[:, 1:]) | (w == 0), axis=1)
    out.append(ok[:n])
  return np.concatenate(out) if out else np.zeros(0, bool)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m experiments.longctx_train")
  ap.add_argument("overrides", nargs="*", help="config key=value overrides (configs/longctx.yaml)")
  ap.add_argument("--config", default="longctx")
  ap.add_argument("--quick", action="store_true", help="CPU sizes: toy model, short prompts")
  ap.add_argument("--lengths", type=int, nargs="+", default=None,
                  help="task prompt lengths cycled over the steps (default 512 1024 2048)")
  ap.add_argument("--families", nargs="+", default=list(longctx.FAMILIES))
  ap.add_argument("--task-tokens", type=int, default=None,
                  help="task prompt tokens per step (default 16 x the longest length; quick 4x)")
  ap.add_argument("--task-weight", type=float, default=1.0)
  ap.add_argument("--eval-n", type=int, default=None, help="val examples per family (and cell)")
  ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
  ap.add_argument("--workers", type=int, default=None, help="example-drawing processes")
  ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this")
  ap.add_argument("--out", default=None, help="where the model goes (default runs/<name>)")
  ap.add_argument("--results", default=None, help="results folder (default results/)")
  ap.add_argument("--tag", default="")
  args = ap.parse_args(argv)
  for f in args.families:
    longctx.family(f)  # an unknown name: a one-line error before anything starts

  from experiments.config import load_config
  from experiments.train import Trainer, prepare_data
  overrides = (QUICK if args.quick else []) + list(args.overrides)
  cfg = load_config(args.config, overrides)
  lengths = args.lengths or (list(QUICK_LENGTHS) if args.quick else [512, 1024, 2048])
  if max(lengths) + TARGET_TOKENS + 1 > cfg.model_config().max_seq_len + 1:
    raise SystemExit(f"--lengths up to {max(lengths)} + {TARGET_TOKENS} target tokens exceed "
                     f"model.max_seq_len {cfg.model_config().max_seq_len}")
  task_tokens = args.task_tokens or max(lengths) * (4 if args.quick else 16)
  eval_n = args.eval_n or (4 if args.quick else 32)
  workers = args.workers or max(1, min(14, (os.cpu_count() or 2) - 2))
  max_minutes = args.max_minutes if args.max_minutes is not None else (
      cfg.max_minutes or (3.0 if args.quick else 7.0))
  data = prepare_data(cfg, progress=False)
  tok = data.tokenizer
  trainer = Trainer(cfg)
  codec, tx = trainer.codec, trainer.tx
  state = trainer.init_state()
  params, opt_state = state.params, state.opt_state
  tw = args.task_weight

  def loss_fn(params, lm, tt, w):
    model = codec.merge(params)
    lm_loss = _ce(model(lm[:, :-1], logits_dtype=model.cfg.dtype), lm[:, 1:])
    task_loss = _ce(model(tt[:, :-1], logits_dtype=model.cfg.dtype), tt[:, 1:], w)
    return lm_loss + tw * task_loss, (lm_loss, task_loss)

  @jax.jit
  def step(params, opt_state, lm, tt, w):
    (_, (lm_loss, task_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, lm, tt, w)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, lm_loss, task_loss

  predict = argmax_predictor(codec)
  stream = ExampleStream(tok.to_str(), cfg.data.source, args.families, lengths, cfg.seed,
                         workers, chunk=8 if not args.quick else 2)
  longest = max(lengths)
  print(f"drawing eval sets ({eval_n} per family at {longest}, needle grid over {lengths[1:]})",
        flush=True)
  fam_eval = stream.eval_set([(f, longest, 10_000 + cfg.seed, eval_n, "val", None)
                              for f in args.families])
  grid_lengths = [n for n in lengths if n >= min(512, longest)] or [longest]
  grid_eval = stream.eval_set([("needle", n, 20_000 + cfg.seed, max(4, eval_n // 2), "val", d)
                               for n in grid_lengths for d in args.depths])
  pad = data.pad_id
  eval_batch = 8 if args.quick else 32

  def evaluate(params) -> dict:
    fn = lambda x: predict(params, x)
    out = {}
    for f in args.families:
      exs = [(p, t) for fam, _, p, t, _ in fam_eval if fam == f]
      out[f] = float(np.mean(exact_match(fn, exs, longest, pad, eval_batch)))
    cells = []
    for d in args.depths:
      row = []
      for n in grid_lengths:
        exs = [(p, t) for _, ln, p, t, dd in grid_eval if ln == n and dd == d]
        row.append(float(np.mean(exact_match(fn, exs, n, pad, eval_batch))))
      cells.append(row)
    out["needle_grid"] = {"lengths": grid_lengths, "depths": list(args.depths),
                          "accuracy": cells, "mean": float(np.mean(cells))}
    return out

  shapes = [(max(1, task_tokens // n), n) for n in lengths]
  rng = np.random.default_rng(cfg.seed)
  curve, evals, times = [], [], []
  t_start = time.time()
  print(f"training {cfg.model_config().num_params() / 1e6:.1f}M params, task shapes {shapes}, "
        f"{workers} workers, at most {max_minutes} min", flush=True)
  s = 0
  for s in range(cfg.steps):
    lm = data.batch("train", s, cfg.batch_size, cfg.seq_len, cfg.seed)
    tb, tl = shapes[s % len(shapes)]
    tt, w = rows(stream.take(rng, tl, tb), tl, pad)
    t0 = time.perf_counter()
    params, opt_state, lm_loss, task_loss = step(params, opt_state, lm, tt, w)
    lm_loss, task_loss = float(lm_loss), float(task_loss)
    times.append(time.perf_counter() - t0)
    curve.append({"step": s + 1, "loss": lm_loss, "task_loss": task_loss, "length": tl})
    last = s + 1 == cfg.steps or time.time() - t_start > 60 * max_minutes
    if (s + 1) % cfg.eval_every == 0 or last:
      ev = evaluate(params)
      ev.update(step=s + 1, wall_s=time.time() - t_start, fresh=stream.n_fresh,
                reused=stream.n_reused)
      evals.append(ev)
      fam = " ".join(f"{f[:6]} {ev[f]:.2f}" for f in args.families)
      print(f"step {s + 1}: loss {lm_loss:.3f} task {task_loss:.3f} | {fam} | needle grid "
            f"{ev['needle_grid']['mean']:.2f} ({ev['wall_s']:.0f} s, fresh rows "
            f"{stream.n_fresh}/{stream.n_fresh + stream.n_reused})", flush=True)
    if last:
      break
  stream.close()
  out = Path(args.out or Path(cfg.out_dir) / cfg.name)
  final = evals[-1]
  info = {"steps": s + 1, "lengths": lengths, "families": args.families,
          "final": {f: final[f] for f in args.families}, "seed": cfg.seed}
  shards = save_model(out, cfg.model_config(), params, tok, info)
  name = f"longctx_train{args.tag}"
  results_dir = Path(args.results) if args.results else RESULTS_DIR
  backend = jax.default_backend()
  plot = plot_curve(evals, args.families, results_dir / f"longctx_accuracy_{backend}{args.tag}.png")
  res = {"config": args.config, "overrides": overrides, "lengths": lengths,
         "task_tokens": task_tokens, "task_weight": tw, "params": cfg.model_config().num_params(),
         "steps": s + 1, "step_s_median": float(np.median(times[1:])) if len(times) > 1 else None,
         "wall_s": time.time() - t_start, "fresh_rows": stream.n_fresh,
         "reused_rows": stream.n_reused, "eval_n": eval_n, "evals": evals, "final": final,
         "curve": curve[::max(1, len(curve) // 500)], "model_dir": str(out),
         "shards": [str(p) for p in shards], "plot": plot.name if plot else None}
  path = write_results(name, res, results_dir)
  print(f"\n{'family':15} {'exact match':>11}")
  for f in args.families:
    print(f"{f:15} {final[f]:11.3f}")
  print(f"{'needle grid':15} {final['needle_grid']['mean']:11.3f}")
  print(f"wrote {path} and the model to {out}")
  return res


def plot_curve(evals: list[dict], families, path: Path) -> Path | None:
  """Teacher-forced exact match per family (and the needle grid's mean) against steps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not evals:
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [e["step"] for e in evals]
  for f in families:
    ax.plot(steps, [e[f] for e in evals], marker=".", label=f)
  ax.plot(steps, [e["needle_grid"]["mean"] for e in evals], "k--", label="needle grid")
  ax.set_xlabel("step")
  ax.set_ylabel("exact match (teacher-forced)")
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title("long-context suite: accuracy while training (full cache)")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  main()
