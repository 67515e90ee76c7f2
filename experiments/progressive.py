"""CoLM runs: progressive chain scaling (a schedule of stages, one command) and extraction.

    python -m experiments train colm_progressive_cpu      # stage 0: 1 chain, stage 1: + chain 2

A config with `stages` trains its model for stages[0].steps; each later stage adds one chain of
width stages[i].add_chain to the previous stage's final model (colm.colm.expand: the logits are
unchanged at the stage's first step), freezes the old chains (freeze_chains; a stage with
`freeze: false` trains every chain) and trains. Stage s
is an ordinary run in <run>/stage<s> with its own checkpoints, so running the command again
resumes inside the stage it was stopped in, or enters the next one from the finished stage's
last checkpoint. Stage s reads batches with data seed `seed + s`: no stage repeats another's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from colm.colm import expand, expanded_config
from experiments.checkpoint import CheckpointError
from experiments.config import TrainConfig, model_spec, to_yaml


def stage_configs(cfg: TrainConfig) -> list[TrainConfig]:
  """The ordinary run config of each stage (folders <out_dir>/<name>/stage<s>)."""
  run_dir = Path(cfg.out_dir) / cfg.name
  mc = cfg.model_config()
  out = []
  for s, st in enumerate(cfg.stages):
    frozen = 0
    if st.add_chain:
      frozen, mc = mc.num_chains if st.freeze else 0, expanded_config(mc, st.add_chain)
    out.append(dataclasses.replace(
        cfg, name=f"stage{s}", out_dir=str(run_dir), model=model_spec(mc), seed=cfg.seed + s,
        steps=st.steps, lr=cfg.lr if st.lr is None else st.lr,
        warmup_steps=cfg.warmup_steps if st.warmup_steps is None else st.warmup_steps,
        freeze_chains=frozen, stages=[]))
  return out


def _has_checkpoint(run_dir: Path) -> bool:
  d = run_dir / "checkpoints"
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def train_progressive(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True,
                      data=None) -> dict[str, Any]:
  """Runs (or resumes) every stage of cfg.stages in order.

  Args:
    cfg: a config with stages.
    stop_after: stop once this many steps in total (over all stages) are done.
  Returns:
    the last stage's train() result, plus "stages": per stage {name, chains, steps, val_loss}.
  """
  from experiments.train import load_run, prepare_data, train
  origin = cfg.stages[0].init_from
  if origin and cfg.data.tokenizer is None:  # the imported model's tokenizer, not a new BPE
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer=str(Path(origin) / "tokenizer.json")))
  run_dir = Path(cfg.out_dir) / cfg.name
  saved = run_dir / "config.yaml"
  if saved.exists():
    from experiments.config import load_config
    if load_config(saved).stages != cfg.stages or load_config(saved).model != cfg.model:
      raise CheckpointError(f"{run_dir} holds a progressive run with another schedule or model; "
                            "choose another name= or delete the folder")
  data = data or prepare_data(cfg, progress)
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(to_yaml(cfg))
    data.tokenizer.save(str(run_dir / "tokenizer.json"))
  done, prev, result, summary = 0, None, {}, []
  for s, scfg in enumerate(stage_configs(cfg)):
    budget = None if stop_after is None else stop_after - done
    if budget is not None and budget <= 0:
      break
    init = None
    if s == 0 and origin and not _has_checkpoint(run_dir / scfg.name):
      # An imported (or any earlier) run as the first stage: its newest verified checkpoint.
      _, model, _, src_step = load_run(origin)
      from colm.params import split_params
      init = split_params(model)[1]
      print(f"stage 0: starting from {origin} (step {src_step})")
      if scfg.steps == 0:  # taken as it is
        prev = (scfg, {"params": init})
        summary.append({"stage": 0, "chains": list(scfg.model_config().chains),
                        "d_model": scfg.model_config().d_model, "steps": 0, "val_loss": None,
                        "init_from": str(origin)})
        continue
    if prev is not None and not _has_checkpoint(run_dir / scfg.name):
      # Entering stage s: grow the finished stage's model by one chain (logits unchanged).
      _, init = expand(prev[0].model_config(), prev[1]["params"], cfg.stages[s].add_chain,
                       jax.random.key(scfg.seed))
    print(f"stage {s}: chains {scfg.model_config().chains} (d_model "
          f"{scfg.model_config().d_model}), {scfg.steps} steps, {scfg.freeze_chains} frozen")
    result = train(scfg, stop_after=budget, progress=progress, data=data, init_params=init)
    summary.append({"stage": s, "chains": list(scfg.model_config().chains),
                    "d_model": scfg.model_config().d_model, "steps": result["step"],
                    "val_loss": result.get("val_loss")})
    if result["step"] < scfg.steps:  # stopped inside the stage (stop_after or max_minutes)
      break
    done += scfg.steps
    prev = (scfg, result)
  if jax.process_index() == 0:
    (run_dir / "stages.json").write_text(json.dumps(summary, indent=2))
  result = dict(result)
  result.update(run_dir=str(run_dir), stages=summary,
                step=sum(r["steps"] for r in summary))
  return result


def extract_run(run_dir: str | Path, chains: int, out: str | Path, step: int | None = None
                ) -> Path:
  """Elastic inference: writes the first `chains` chains of a run as a standalone run folder.

  The new folder holds config.yaml (the k-chain model), tokenizer.json and one checkpoint (the
  sub-model's parameters, a fresh optimizer state), so eval / generate / train take it like any
  run. Its logits equal the source model's run with num_chains=chains (colm.colm.extract).
  """
  from colm.colm import extract
  from colm.params import split_params
  from experiments.checkpoint import Checkpoints
  from experiments.train import Trainer, load_run, make_mesh
  out = Path(out)
  if (out / "config.yaml").exists():
    raise CheckpointError(f"{out} is already a run folder; choose another --out")
  cfg, model, tok, src_step = load_run(run_dir, step)
  sub_cfg, sub_params = extract(model.cfg, split_params(model)[1], chains)
  weights = None if cfg.scale_weights is None else cfg.scale_weights[:chains]
  new = dataclasses.replace(cfg, name=out.name, out_dir=str(out.parent), model=model_spec(sub_cfg),
                            stages=[], freeze_chains=0, scale_weights=weights)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.yaml").write_text(to_yaml(new))
  tok.save(str(out / "tokenizer.json"))
  trainer = Trainer(new, mesh=make_mesh(-1, 1))
  state = trainer.init_state(sub_params)
  ckpt = Checkpoints(out / "checkpoints", keep=new.keep_checkpoints)
  try:
    ckpt.save(src_step, {"params": state.params, "opt_state": state.opt_state},
              {"step": src_step, "model": dataclasses.asdict(sub_cfg),
               "extracted_from": str(run_dir), "chains": chains})
  finally:
    ckpt.close()
  return out
