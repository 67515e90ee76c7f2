"""Run configuration: typed dataclasses read from YAML files through OmegaConf, validated.

A config file under experiments/configs/ names a model preset plus field overrides, the data and
the optimisation; `key=value` arguments override it (`model.chains=[16,16]`, `steps=500`). An
unknown or mistyped key, a value of the wrong type, or an impossible combination is a one-line
ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from colm.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
  """A bad configuration: the message names the key."""


def _model_spec_fields():
  """Every ModelConfig field as an optional override (None = the preset's value), plus `preset`."""
  hints = typing.get_type_hints(ModelConfig)
  fields = [("preset", str, dataclasses.field(default="small"))]
  for f in dataclasses.fields(ModelConfig):
    tp = hints[f.name]
    if typing.get_origin(tp) is tuple:
      tp = list[typing.get_args(tp)[0]]
    fields.append((f.name, tp | None, dataclasses.field(default=None)))
  return fields


ModelSpec = dataclasses.make_dataclass("ModelSpec", _model_spec_fields())
ModelSpec.__doc__ = "A model preset name plus optional overrides of any ModelConfig field."


@dataclasses.dataclass
class DataSpec:
  """Where the text comes from (the tokenizer's vocabulary size is model.vocab_size)."""

  source: str = "stdlib"  # 'stdlib' (the embedded corpus, ~12 MB), 'python' (the stdlib plus the
  # installed packages' .py files, ~100 MB, machine-dependent) or a path to a text file or folder
  val_fraction: float = 0.05  # share of files (for 'python': of installed packages) held out
  max_bytes: int | None = None  # cap on corpus bytes, for quick runs ('python': 100 MB when None)
  cache_dir: str = "runs/.data_cache"  # tokenizers and token memmaps, shared between runs
  tokenizer: str | None = None  # a tokenizer.json to encode with (an imported model's); None:
  # train a byte-level BPE of model.vocab_size on the corpus


@dataclasses.dataclass
class StageSpec:
  """One stage of a progressive (CoLM) schedule: optionally add a chain, then train."""

  add_chain: int = 0  # hidden width of a chain added before this stage (0: none; first stage)
  steps: int = 100  # optimizer steps of this stage (old chains frozen after an add_chain)
  lr: float | None = None  # peak learning rate of the stage (None: the run's lr)
  init_from: str | None = None  # first stage only: start from this run folder's newest verified
  # checkpoint (an imported model, say); its model replaces `model`; steps may then be 0
  warmup_steps: int | None = None  # (None: the run's warmup_steps)
  freeze: bool = True  # after an add_chain: the old chains get no updates (False: all train)


@dataclasses.dataclass
class TrainConfig:
  """Everything a training run needs; saved resolved as config.yaml in the run folder."""

  name: str = "run"  # run folder: <out_dir>/<name>
  out_dir: str = "runs"
  seed: int = 0  # parameter init and batch order
  model: Any = dataclasses.field(default_factory=ModelSpec)
  data: DataSpec = dataclasses.field(default_factory=DataSpec)
  steps: int = 1000  # optimizer steps in total
  batch_size: int = 16  # sequences per step (global, over all devices)
  seq_len: int = 256  # tokens per sequence
  lr: float = 3e-3  # peak learning rate
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
  warmup_steps: int = 100  # linear warm-up
  weight_decay: float = 0.1  # AdamW decay on matrices (not norms)
  b1: float = 0.9
  b2: float = 0.95
  adam_eps: float = 1e-8  # Adam's epsilon (optax's default)
  grad_clip: float = 1.0  # global-norm clipping (0 = off)
  log_every: int = 10  # train metrics to metrics.jsonl / TensorBoard
  eval_every: int = 200  # validation loss
  eval_batches: int = 8  # batches per validation
  save_every: int = 200  # checkpoint interval
  keep_checkpoints: int = 3  # newest checkpoints kept
  mesh_data: int = -1  # data-parallel axis size (-1: all devices over fsdp)
  mesh_fsdp: int = 1  # parameter-sharding axis size (also splits the batch)
  mesh_tensor: int = 1  # tensor-parallel axis size: heads, FFN width and vocabulary
  max_minutes: float = 0.0  # stop (after a checkpoint) when this much wall time passed (0 = off)
  sample_prompt: str = "def "  # printed sample at the end
  sample_tokens: int = 64
  peak_tflops: float = 989.0  # dense bf16 peak for MFU (H100/H200 SXM); ignored on CPU
  scale_weights: list[float] | None = None  # CoLM multi-scale loss sum_k w_k CE(chains 1..k)
  freeze_chains: int = 0  # chains 1..n get no updates (progressive scaling sets this)
  stages: list[StageSpec] = dataclasses.field(default_factory=list)  # progressive schedule:
  # stage 0 trains `model`, each later stage adds a chain (old ones frozen unless the stage's
  # freeze is false); steps = their sum
  divergence_spike: float = 5.0  # a loss above this x its recent average is divergence (0 = off)
  divergence_window: int = 20  # steps in the loss average (and steps before spikes are checked)
  on_divergence: str = "stop"  # 'stop' (save the pre-update state, exit 2) or 'rollback'
  rollback_lr_factor: float = 0.5  # rollback: the learning rate is multiplied by this
  max_rollbacks: int = 3  # rollback: give up (as 'stop') after this many

  def model_config(self) -> ModelConfig:
    if self.stages and self.stages[0].init_from:  # the imported (or earlier) run's model
      return load_config(Path(self.stages[0].init_from) / "config.yaml").model_config()
    return build_model_config(self.model)


MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def build_model_config(spec: Any) -> ModelConfig:
  """ModelSpec (or a mapping) -> ModelConfig: the preset with the non-None fields applied."""
  d = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else (
      dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec))
  preset = d.pop("preset", "small")
  overrides = {k: (tuple(v) if k == "chains" else v) for k, v in d.items() if v is not None}
  if any(str(a).startswith("s2:") for a in overrides.get("layer_attn") or ()):
    import s2attn.attention  # noqa: F401  (registers the "s2:" layer specs)
  try:
    return ModelConfig.preset(preset, **overrides)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None


def model_spec(mc: ModelConfig) -> Any:
  """A ModelSpec that rebuilds exactly `mc` (every field set)."""
  d = {f.name: getattr(mc, f.name) for f in dataclasses.fields(ModelConfig)}
  return ModelSpec(preset="small", **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in d.items()})


def _check_colm(cfg: TrainConfig, mc: ModelConfig, need) -> None:
  """scale_weights, freeze_chains and the progressive stages (chain expansions must be valid)."""
  from colm.colm import check_scale_weights, expanded_config, trainable_mask
  if cfg.scale_weights is not None:
    try:
      check_scale_weights(mc, cfg.scale_weights)
    except ValueError as e:
      raise ConfigError(f"scale_weights: {e}") from None
  if cfg.freeze_chains:
    try:
      trainable_mask(mc, cfg.freeze_chains)
    except ValueError as e:
      raise ConfigError(f"freeze_chains: {e}") from None
  if not cfg.stages:
    return
  need(cfg.scale_weights is None and cfg.freeze_chains == 0, "stages",
       "a progressive schedule sets the frozen chains itself; leave scale_weights and "
       "freeze_chains unset")
  need(sum(s.steps for s in cfg.stages) == cfg.steps, "steps",
       f"{cfg.steps} must equal the sum of stages[*].steps "
       f"({sum(s.steps for s in cfg.stages)}), the run's total")
  for i, st in enumerate(cfg.stages):
    key = f"stages.{i}"
    need(st.init_from is None or i == 0, f"{key}.init_from", "only the first stage may start "
         "from another run")
    if st.init_from is not None:
      need((Path(st.init_from) / "config.yaml").is_file(), f"{key}.init_from",
           f"{st.init_from} is not a run folder (no config.yaml)")
    need(st.steps > 0 or st.init_from is not None, f"{key}.steps",
         f"must be positive, got {st.steps}")
    need((st.add_chain == 0) == (i == 0), f"{key}.add_chain",
         "the first stage trains the configured model (add_chain 0); every later stage adds a "
         f"chain (add_chain > 0), got {st.add_chain}")
    warm = cfg.warmup_steps if st.warmup_steps is None else st.warmup_steps
    need(st.steps == 0 or 0 <= warm < st.steps, f"{key}.warmup_steps",
         f"{warm} must be in [0, {st.steps})")
    need(st.lr is None or st.lr > 0, f"{key}.lr", f"must be positive, got {st.lr}")
    need(st.freeze or st.add_chain > 0, f"{key}.freeze", "freeze=false needs an add_chain: the "
         "first stage has no old chains to freeze or unfreeze")
    if st.add_chain:
      try:
        mc = expanded_config(mc, st.add_chain)
      except ValueError as e:
        raise ConfigError(f"{key}.add_chain: {e}") from None


def _check(cfg: TrainConfig) -> None:
  def need(cond, key, msg):
    if not cond:
      raise ConfigError(f"{key}: {msg}")

  mc = cfg.model_config()
  _check_colm(cfg, mc, need)
  for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
              "save_every", "keep_checkpoints", "sample_tokens"):
    need(getattr(cfg, key) > 0, key, f"must be positive, got {getattr(cfg, key)}")
  need(cfg.seq_len <= mc.max_seq_len, "seq_len",
       f"{cfg.seq_len} exceeds model.max_seq_len={mc.max_seq_len}")
  need(cfg.lr > 0, "lr", f"must be positive, got {cfg.lr}")
  need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
  need(0 <= cfg.warmup_steps < cfg.steps, "warmup_steps",
       f"{cfg.warmup_steps} must be in [0, steps={cfg.steps})")
  need(cfg.adam_eps > 0, "adam_eps", f"must be positive, got {cfg.adam_eps}")
  need(cfg.grad_clip >= 0, "grad_clip", f"must be >= 0, got {cfg.grad_clip}")
  need(cfg.divergence_spike == 0 or cfg.divergence_spike > 1, "divergence_spike",
       f"must be 0 (off) or > 1, got {cfg.divergence_spike}")
  need(cfg.divergence_window >= 1, "divergence_window", "must be >= 1")
  need(cfg.on_divergence in ("stop", "rollback"), "on_divergence",
       f"must be 'stop' or 'rollback', got {cfg.on_divergence!r}")
  need(0 < cfg.rollback_lr_factor <= 1, "rollback_lr_factor", "must be in (0, 1]")
  need(cfg.max_rollbacks >= 0, "max_rollbacks", "must be >= 0")
  need(cfg.data.tokenizer is None or Path(cfg.data.tokenizer).is_file(), "data.tokenizer",
       f"no file {cfg.data.tokenizer}")
  need(cfg.mesh_fsdp >= 1, "mesh_fsdp", f"must be >= 1, got {cfg.mesh_fsdp}")
  need(cfg.mesh_tensor >= 1, "mesh_tensor", f"must be >= 1, got {cfg.mesh_tensor}")
  need(cfg.mesh_data == -1 or cfg.mesh_data >= 1, "mesh_data", "must be -1 or >= 1")
  need(0 < cfg.data.val_fraction <= 0.5, "data.val_fraction", "must be in (0, 0.5]")
  need(cfg.data.max_bytes is None or cfg.data.max_bytes > 0, "data.max_bytes", "must be > 0")
  need(mc.vocab_size >= 300, "model.vocab_size",
       f"{mc.vocab_size} is too small for a byte-level BPE (>= 300)")
  need("/" not in cfg.name and cfg.name not in ("", ".", ".."), "name",
       f"{cfg.name!r} must be a plain folder name")


def load_config(path_or_name: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
  """Reads a config file (a path, or a name under experiments/configs/), applies key=value
  overrides, validates, and returns the typed TrainConfig. Raises ConfigError naming the key."""
  schema = OmegaConf.structured(TrainConfig)
  try:
    merged = schema
    if path_or_name is not None:
      path = resolve_config_path(path_or_name)
      merged = OmegaConf.merge(merged, OmegaConf.load(path))
    for o in overrides:
      if "=" not in o:
        raise ConfigError(f"override {o!r} is not key=value")
    if overrides:
      merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.to_object(merged)
  except OmegaConfBaseException as e:
    key = getattr(e, "full_key", None) or "config"
    msg = str(e).splitlines()[0]
    raise ConfigError(f"{key}: {msg}") from None
  _check(cfg)
  return cfg


def resolve_config_path(path_or_name: str | Path) -> Path:
  p = Path(path_or_name)
  if p.is_file():
    return p
  for cand in (CONFIG_DIR / f"{path_or_name}.yaml", CONFIG_DIR / str(path_or_name)):
    if cand.is_file():
      return cand
  known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
  raise ConfigError(f"config: no file {path_or_name!r} (known configs: {', '.join(known)})")


def to_yaml(cfg: TrainConfig) -> str:
  return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flat_items(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of a config (TrainConfig, or any dataclass / mapping / list tree)."""
  if dataclasses.is_dataclass(cfg):
    cfg = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, dict):
    out = {}
    for k, v in cfg.items():
      out.update(flat_items(v, f"{prefix}{k}."))
    return out
  if isinstance(cfg, list) and cfg and any(dataclasses.is_dataclass(x) for x in cfg):
    out = {}
    for i, v in enumerate(cfg):
      out.update(flat_items(v, f"{prefix}{i}."))
    return out
  return {prefix[:-1]: cfg}


def config_diff(stored: TrainConfig, requested: TrainConfig, model_only: bool = False
                ) -> list[str]:
  """'key: stored X, requested Y' for each differing key (the model by its resolved fields)."""
  a, b = flat_items(stored), flat_items(requested)
  for d, c in ((a, stored), (b, requested)):
    for k in [k for k in d if k.startswith("model.")]:
      del d[k]
    d.update({f"model.{k}": v for k, v in flat_items(c.model_config()).items()})
  keys = [k for k in sorted(set(a) | set(b)) if k not in ("name", "out_dir")
          and (not model_only or k.startswith("model."))]
  return [f"{k}: stored {a.get(k)!r}, requested {b.get(k)!r}" for k in keys
          if a.get(k) != b.get(k)]


def describe(cfg: TrainConfig) -> str:
  """Every key of the resolved config with its type and value, one per line (`config NAME`)."""
  hints = typing.get_type_hints(TrainConfig)
  mhints = typing.get_type_hints(ModelConfig)
  lines = []
  for key, value in flat_items(cfg).items():
    if key.startswith("model."):
      continue
    top, _, rest = key.partition(".")
    tp = hints.get(top) if not rest else (typing.get_type_hints(type(getattr(cfg, top))).get(rest)
                                          if dataclasses.is_dataclass(getattr(cfg, top)) else None)
    lines.append(f"{key:<28} {_type_name(tp):<20} {value!r}")
  for key, value in flat_items(cfg.model_config()).items():
    lines.append(f"{'model.' + key:<28} {_type_name(mhints.get(key)):<20} {value!r}")
  return "\n".join(lines)


def _type_name(tp: Any) -> str:
  if tp is None:
    return "-"
  if isinstance(tp, type):
    return tp.__name__
  return str(tp).replace("typing.", "").replace(f"{__name__}.", "")


def list_configs() -> list[str]:
  return sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
