"""CoLM experiments (issue 18 items 4 and 5): the stage-0 model is the (16,16) model's chain-1
sub-model, the equal-FLOPs budget split, the unfrozen-stage option, and both experiments end to
end at toy size (a few steps on the shared generated corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from colm.colm import extract
from colm.params import split_params
from experiments import colm_experiments as ce
from experiments.config import ConfigError, load_config
from experiments.progressive import stage_configs
from experiments.train import load_run

SEED = 0  # every run's cfg.seed (parameter init and batch order)
TOY = ["model.vocab_size=320", "model.d_model=64", "model.head_dim=8", "model.n_layers=1",
       "model.max_seq_len=32", "seq_len=32", "batch_size=4", "eval_batches=1",
       "sample_tokens=4"]


@pytest.mark.parametrize("quick", [True, False])
def test_stage0_is_the_chain1_submodel(tmp_path, quick):
  full = ce.variant_config("c16x2", quick, tmp_path).model_config()
  old = ce.variant_config("progressive", quick, tmp_path)  # the equal-tokens variant's stage 0
  ce.check_stage0(old.model_config(), full)
  assert stage_configs(old)[-1].model_config().chain_dims == full.chain_dims
  s0 = ce.stage0_model(full)
  assert (s0.chains, s0.d_model, s0.n_heads, s0.n_kv_heads, s0.ffn_dim) == (
      (1,), full.chain_dims[0], full.chain_heads[0], full.chain_kv_heads[0], full.chain_ffn[0])
  assert (s0.vocab_size, s0.head_dim, s0.tie_embeddings, s0.separate_heads, s0.n_layers) == (
      full.vocab_size, full.head_dim, full.tie_embeddings, full.separate_heads, full.n_layers)


def test_check_stage0_names_the_differing_field(tmp_path):
  full = ce.variant_config("c16x2", True, tmp_path).model_config()
  s0 = ce.stage0_model(full)
  with pytest.raises(ValueError, match="ffn_dim: 276 vs 277"):
    ce.check_stage0(s0.replace(ffn_dim=276), full)
  with pytest.raises(ValueError, match="head_dim"):
    ce.check_stage0(s0.replace(head_dim=8, n_heads=8, n_kv_heads=4), full)


@pytest.mark.parametrize("quick, steps", [(True, None), (False, None), (False, 7)])
def test_equal_flops_budget_split(tmp_path, quick, steps):
  scratch = ce.variant_config("c16x2", quick, tmp_path, steps)
  cfgs = ce.flops_configs(scratch, tmp_path / "configs")
  full_step = ce.step_flops(scratch)
  budget = scratch.steps * full_step
  s0_step = ce.step_flops(scratch, ce.stage0_model(scratch.model_config()))
  assert s0_step < full_step / 2  # chain 1 alone is much cheaper per token
  assert cfgs["chain1_only"].steps == round(budget / s0_step)
  for name in ("progressive_frozen", "progressive_unfrozen"):
    st = cfgs[name].stages
    assert [s.steps for s in st] == [round(budget / 2 / s0_step), round(budget / 2 / full_step)]
    assert [s.freeze for s in st] == [True, name.endswith("_frozen")]
    assert [c.freeze_chains for c in stage_configs(cfgs[name])] == \
        [0, 1 if name.endswith("_frozen") else 0]
  for name, cfg in cfgs.items():
    total = sum(n * f for n, f in ce.stage_flops(cfg))
    assert abs(total - budget) <= full_step, (name, total, budget)


def test_stage_freeze_false_needs_an_added_chain(tmp_path):
  base = ["model.preset=tiny", "model.d_model=24", "model.n_heads=2", "model.n_kv_heads=1",
          "model.head_dim=8", "model.ffn_dim=30", "steps=6", "warmup_steps=1", "seq_len=16",
          "model.vocab_size=320"]
  with pytest.raises(ConfigError, match=r"^stages\.0\.freeze:"):
    load_config(None, [*base, "stages=[{steps: 3, freeze: false}, {add_chain: 24, steps: 3}]"])
  cfg = load_config(None, [*base, "stages=[{steps: 3}, {add_chain: 24, steps: 3, freeze: false}]"])
  assert [c.freeze_chains for c in stage_configs(cfg)] == [0, 0]


def _run(experiment: str, tmp_path: Path, corpus: Path, *more: str) -> dict:
  print(f"seed {SEED}")
  ce.main(["--experiment", experiment, "--quick", "--steps", "4", "--runs", str(tmp_path / "runs"),
           "--out", str(tmp_path / "results"), "--source", str(corpus), "--no-progress",
           "--set", *TOY, f"data.cache_dir={tmp_path / 'cache'}", f"seed={SEED}", *more])
  (path,) = (tmp_path / "results").glob(f"colm_{experiment}_*.json")
  assert (tmp_path / "results" / path.name.replace(".json", ".png")).is_file()
  return json.loads(path.read_text())


def test_parity_end_to_end(tmp_path, corpus):
  res = _run("parity", tmp_path, corpus, "--lrs", "1.5e-3,3e-3")
  rows = {r["variant"]: r for r in res["rows"]}
  assert list(rows) == ["baseline_lr0.0015", "baseline_lr0.003", "c16x2", "c16x2_air", "c8x4"]
  assert [rows[n]["lr"] for n in ("baseline_lr0.0015", "baseline_lr0.003")] == [1.5e-3, 3e-3]
  for r in res["rows"]:
    assert len(r["val_loss_per_scale"]) == len(r["chains"])
    assert r["tokens"] == 4 * 4 * 32 and r["epochs"] > 0
  best = min((rows[n] for n in rows if n.startswith("baseline")), key=lambda r: r["val_loss"])
  assert res["best_baseline"]["val_loss"] == best["val_loss"]
  assert set(res["gaps"]) == set(res["pass"]) == {"c16x2", "c16x2_air", "c8x4"}
  for n, gap in res["gaps"].items():
    assert gap == pytest.approx(rows[n]["val_loss"] / best["val_loss"] - 1)
    assert res["pass"][n] == (gap <= ce.PARITY_TARGET)
  assert res["corpus"]["source"] == str(corpus) and res["corpus"]["train_tokens"] > 0


def test_progressive_flops_end_to_end(tmp_path, corpus):
  res = _run("progressive_flops", tmp_path, corpus, "--seed", str(SEED))  # names get _seed<N>
  assert [p.name for p in (tmp_path / "results").glob("*.json")] == [
      f"colm_progressive_flops_seed{SEED}_cpu.json"]
  budget, full_step = res["budget_flops"], res["full_step_flops"]
  rows = {r["variant"]: r for r in res["rows"]}
  assert list(rows) == list(ce.FLOPS_VARIANTS)
  assert budget == pytest.approx(4 * full_step) and rows["scratch"]["steps"] == 4
  assert rows["chain1_only"]["steps"] > 2 * 4  # cheaper per token: more steps for F
  for r in res["variants"]:
    assert abs(r["flops"] - budget) <= full_step, r["name"]
    flops = [p["flops"] for p in r["curves"]["val"]]
    assert flops == sorted(flops) and flops[-1] == pytest.approx(r["flops"])
  assert rows["progressive_frozen"]["stage_steps"][1] == 2
  assert res["scratch_val_loss"] == rows["scratch"]["val_loss"]
  assert set(res["pass"]) == {"progressive_frozen", "progressive_unfrozen"}
  for p in res["pass"].values():
    assert set(p) == {"reaches_scratch_within_budget", "beats_chain1_only"}
  # Frozen: chain 1 of the final model is stage 0's model bit for bit; unfrozen: it trained on.
  runs = next((tmp_path / "runs").iterdir())
  assert runs.name.endswith(f"_seed{SEED}")
  for name, same in (("progressive_frozen", True), ("progressive_unfrozen", False)):
    _, m0, _, _ = load_run(runs / name / "stage0")
    _, m1, _, _ = load_run(runs / name)
    p0 = split_params(m0)[1]
    _, p1 = extract(m1.cfg, split_params(m1)[1], 1)
    equal = all(np.array_equal(np.asarray(p0[k]), np.asarray(p1[k])) for k in p0)
    assert equal == same, name
