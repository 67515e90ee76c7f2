"""Hugging Face LLaMA-family checkpoints (LLaMA, Mistral, Qwen2/2.5) in and out of run folders.

    python -m experiments import ~/models/Qwen2.5-0.5B --out runs/qwen05
    python -m experiments generate runs/qwen05 --prompt "def fib(n):"
    python -m experiments export runs/qwen05 --out /tmp/qwen05_hf

A Hugging Face folder holds config.json, model.safetensors (or shards named by
model.safetensors.index.json) and tokenizer.json. Import maps it onto the decoder with
chains=(1,): HF stores a linear layer as weight [out, in] and ours is kernel [in, out], so
every projection is transposed; HF's rotary embedding is the rotate-half form ours uses, so
q/k need no permutation. The run folder (config.yaml, tokenizer.json, one checkpoint, import.json)
is written under a temporary name and renamed when complete: a failed import leaves nothing at
--out. Export writes the same format back (bit-exact for the dtype the run stores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from colm.config import ModelConfig
from experiments.safetensors_io import SafetensorsError, read_header, read_tensor, write_file

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
INDEX = "model.safetensors.index.json"


class HFError(ValueError):
  """A folder that cannot be imported (or a run that cannot be exported): names the file."""


def model_config(hf: dict[str, Any], path: Path, max_seq_len: int | None = None) -> ModelConfig:
  """config.json (as a dict) -> ModelConfig with chains=(1,); HFError for what is unsupported."""
  where = path / "config.json"
  arch = (hf.get("architectures") or [None])[0]
  if arch not in ARCHITECTURES:
    raise HFError(f"{where}: architecture {arch!r} is not supported (supported: "
                  f"{', '.join(ARCHITECTURES)})")
  family = ARCHITECTURES[arch]
  if hf.get("hidden_act", "silu") != "silu":
    raise HFError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
  if hf.get("mlp_bias") or (family != "qwen2" and hf.get("attention_bias")):
    raise HFError(f"{where}: biases on the MLP or the output projection are not supported")
  try:
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kw = dict(vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]),
              n_heads=heads, n_kv_heads=int(hf.get("num_key_value_heads") or heads),
              head_dim=int(hf.get("head_dim") or d // heads),
              ffn_dim=int(hf["intermediate_size"]))
  except KeyError as e:
    raise HFError(f"{where}: missing key {e.args[0]!r}") from None
  scaling = hf.get("rope_scaling") or {}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "llama3":
    kw.update(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
              rope_low_freq_factor=float(scaling["low_freq_factor"]),
              rope_high_freq_factor=float(scaling["high_freq_factor"]),
              rope_original_len=int(scaling["original_max_position_embeddings"]))
  elif kind != "default":
    raise HFError(f"{where}: rope_scaling type {kind!r} is not supported (supported: llama3)")
  longest = int(hf.get("max_position_embeddings", 4096))
  window = hf.get("sliding_window") if hf.get("use_sliding_window", family == "mistral") else None
  if window:  # within the window, sliding-window attention is full attention: stay inside it
    longest = min(longest, int(window))
  if max_seq_len is not None:
    if max_seq_len > longest:
      raise HFError(f"--max-seq-len {max_seq_len} exceeds the model's {longest} positions")
    longest = max_seq_len
  try:
    return ModelConfig(**kw, chains=(1,), tie_embeddings=bool(hf.get("tie_word_embeddings",
                                                                     False)),
                       rope_theta=float(hf.get("rope_theta", 10000.0)),
                       norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=longest,
                       qkv_bias=family == "qwen2", attn_impl="auto", init_std=0.02)
  except ValueError as e:
    raise HFError(f"{where}: {e}") from None


def tensor_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
  """{our flat parameter name: (HF tensor name, transposed)} for a 1-chain model."""
  out = {"embed": ("model.embed_tokens.weight", False),
         "final_norm.scale": ("model.norm.weight", False)}
  if not cfg.tie_embeddings:
    out["head"] = ("lm_head.weight", True)
  for i in range(cfg.n_layers):
    ours, hf = f"layers.{i}.", f"model.layers.{i}."
    out[ours + "attn_norm.scale"] = (hf + "input_layernorm.weight", False)
    out[ours + "ffn_norm.scale"] = (hf + "post_attention_layernorm.weight", False)
    for p in "qkvo":
      out[ours + f"attn.{p}.kernels.0"] = (hf + f"self_attn.{p}_proj.weight", True)
    if cfg.qkv_bias:
      for p in "qkv":
        out[ours + f"attn.{p}_bias"] = (hf + f"self_attn.{p}_proj.bias", False)
    for p in ("gate", "up", "down"):
      out[ours + f"ffn.{p}.kernels.0"] = (hf + f"mlp.{p}_proj.weight", True)
  return out


def _weight_map(path: Path) -> dict[str, Path]:
  """{HF tensor name: shard file}, from the index or the single model.safetensors."""
  index = path / INDEX
  if index.is_file():
    try:
      names = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError):
      raise HFError(f"{index}: not a safetensors index (no weight_map)") from None
    for shard in sorted(set(names.values())):
      if not (path / shard).is_file():
        raise HFError(f"{index} names shard {shard}, which is missing from {path}")
    return {k: path / v for k, v in names.items()}
  single = path / "model.safetensors"
  if not single.is_file():
    raise HFError(f"{path}: no model.safetensors and no {INDEX}")
  return {k: single for k in read_header(single)[0]}


def read_params(path: Path, cfg: ModelConfig, dtype: str = "float32", progress: bool = True
                ) -> dict[str, np.ndarray]:
  """Our flat params from the folder's shards, each checked for presence and shape."""
  from tqdm.auto import tqdm

  from colm.colm import abstract_params
  want = {k: tuple(v.shape) for k, v in abstract_params(cfg).items()}
  names = tensor_names(cfg)
  assert set(names) == set(want), sorted(set(names) ^ set(want))
  where = _weight_map(path)
  headers: dict[Path, tuple[dict, int]] = {}
  out = {}
  for ours, (hf, transposed) in tqdm(names.items(), desc="import", unit="tensor",
                                     disable=not progress):
    if hf not in where:
      raise HFError(f"{path}: tensor {hf} is in no shard")
    shard = where[hf]
    if shard not in headers:
      headers[shard] = read_header(shard)
    header, offset = headers[shard]
    if hf not in header:
      raise HFError(f"{shard}: tensor {hf} is missing (the index says it is here)")
    shape = tuple(header[hf]["shape"])
    expect = want[ours][::-1] if transposed else want[ours]
    if shape != expect:
      raise HFError(f"{shard}: tensor {hf} has shape {list(shape)}, config.json implies "
                    f"{list(expect)}")
    x = read_tensor(shard, hf, header, offset)
    out[ours] = np.ascontiguousarray(x.T if transposed else x).astype(dtype)
  return out


def import_hf(path: str | Path, out: str | Path, *, dtype: str = "float32",
              max_seq_len: int | None = None, progress: bool = True) -> Path:
  """Writes a run folder at `out` from the Hugging Face folder `path` (nothing on failure)."""
  from experiments.config import DataSpec, TrainConfig, model_spec, to_yaml
  path, out = Path(path).expanduser(), Path(out)
  if not path.is_dir():
    raise HFError(f"{path} is not a folder")
  if out.exists():
    raise HFError(f"{out} already exists; choose another --out")
  if not (path / "config.json").is_file():
    raise HFError(f"{path}: no config.json (not a Hugging Face model folder)")
  try:
    hf = json.loads((path / "config.json").read_text())
  except ValueError:
    raise HFError(f"{path / 'config.json'}: not JSON") from None
  mc = model_config(hf, path, max_seq_len).replace(param_dtype=dtype, dtype=dtype)
  tok_file = path / "tokenizer.json"
  if not tok_file.is_file():
    raise HFError(f"{path}: no tokenizer.json")
  import tokenizers
  try:
    tokenizers.Tokenizer.from_file(str(tok_file))
  except Exception as e:  # the Rust library raises plain Exceptions
    raise HFError(f"{tok_file}: cannot be read by tokenizers ({str(e)[:120]})") from None
  try:
    params = read_params(path, mc, dtype, progress)
  except SafetensorsError as e:
    raise HFError(str(e)) from None
  out = out.resolve()
  cfg = TrainConfig(name=out.name, out_dir=str(out.parent), model=model_spec(mc),
                    data=DataSpec(tokenizer=str(out / "tokenizer.json"), max_bytes=4_000_000),
                    seq_len=min(256, mc.max_seq_len), batch_size=4, sample_tokens=32)
  eos = hf.get("eos_token_id")
  info = {"source": str(path.resolve()), "architecture": hf["architectures"][0],
          "eos_token_ids": [] if eos is None else list(np.atleast_1d(eos).tolist()),
          "torch_dtype": hf.get("torch_dtype")}
  tmp = out.parent / f".{out.name}.importing{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir(parents=True)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    shutil.copyfile(tok_file, tmp / "tokenizer.json")
    (tmp / "import.json").write_text(json.dumps(info, indent=1))
    save_params(tmp / "checkpoints", cfg, params, {"imported_from": info["source"]})
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def save_params(directory: Path, cfg, params: dict[str, Any], meta: dict[str, Any]) -> None:
  """One checkpoint (step 0) of `params` with a fresh optimizer state, as a run's."""
  from experiments.checkpoint import Checkpoints
  from experiments.train import Trainer, make_mesh
  trainer = Trainer(cfg, mesh=make_mesh(-1, 1))
  state = trainer.init_state(params)
  ckpt = Checkpoints(directory, keep=cfg.keep_checkpoints)
  try:
    ckpt.save(0, {"params": state.params, "opt_state": state.opt_state},
              {**state.meta(), "model": dataclasses.asdict(trainer.model_cfg), **meta})
  finally:
    ckpt.close()


def _tokenizer_file(run_dir: Path) -> Path:
  """The tokenizer.json of a run (a progressive run keeps it at its top level)."""
  for d in (run_dir, run_dir.parent):
    if (d / "tokenizer.json").is_file():
      return d / "tokenizer.json"
  raise HFError(f"{run_dir}: no tokenizer.json")


def hf_config(cfg: ModelConfig, architecture: str | None = None,
              eos: list[int] | None = None) -> dict[str, Any]:
  """The config.json of a 1-chain model."""
  arch = architecture or ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
  out = {"architectures": [arch], "model_type": ARCHITECTURES[arch],
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
         "intermediate_size": cfg.ffn_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
         "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype,
         "attention_bias": False, "mlp_bias": False, "sliding_window": None,
         "use_sliding_window": False, "rope_scaling": None}
  if cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                           "low_freq_factor": cfg.rope_low_freq_factor,
                           "high_freq_factor": cfg.rope_high_freq_factor,
                           "original_max_position_embeddings": cfg.rope_original_len}
  if eos:
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  return out


def export_hf(run_dir: str | Path, out: str | Path, *, step: int | None = None,
              shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
  """Writes a run's model as a Hugging Face folder (config.json, shards + index when more than
  one, tokenizer.json); the run must hold a plain 1-chain model."""
  from tqdm.auto import tqdm

  from colm.params import split_params
  from experiments.train import load_run
  run_dir, out = Path(run_dir), Path(out)
  if out.exists():
    raise HFError(f"{out} already exists; choose another --out")
  _, model, _, _ = load_run(run_dir, step)
  cfg = model.cfg
  if cfg.num_chains != 1 or cfg.air or cfg.separate_heads or cfg.layer_attn:
    raise HFError(f"{run_dir}: only a plain 1-chain model exports to the LLaMA format (this one "
                  f"has chains={cfg.chains}); `extract --chains 1` first")
  info_file = run_dir / "import.json"
  info = json.loads(info_file.read_text()) if info_file.is_file() else {}
  params = split_params(model)[1]
  tensors = {}
  for ours, (hf, transposed) in tqdm(tensor_names(cfg).items(), desc="export", unit="tensor",
                                     disable=not progress):
    x = np.asarray(params[ours])
    tensors[hf] = np.ascontiguousarray(x.T if transposed else x)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  tmp = out.parent / f".{out.name}.exporting{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir(parents=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
      write_file(tmp / fname, shard, {"format": "pt"})
    if len(shards) > 1:
      (tmp / INDEX).write_text(json.dumps({
          "metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
          "weight_map": {n: f for f, s in zip(names, shards) for n in s}}, indent=1))
    (tmp / "config.json").write_text(json.dumps(
        hf_config(cfg, info.get("architecture"), info.get("eos_token_ids")), indent=1))
    shutil.copyfile(_tokenizer_file(run_dir), tmp / "tokenizer.json")
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
