"""Shared pytest setup: CPU by default, the `gpu` marker skips where no GPU is present, and the
model builders the cache, decoding and S2 tests share."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@functools.cache
def _spread_decoder(cfg, seed: int):
  from experiments.bench_batch import spread_decoder
  return spread_decoder(cfg, seed)


@pytest.fixture(scope="session")
def spread_decoder():
  """make(cfg, seed) -> a Decoder with NumPy weights scaled so logits spread out (greedy choices
  far from ties), built abstractly (eager init would compile a kernel per parameter shape)."""
  return _spread_decoder


@functools.cache
def _forward_fn(graphdef, num_chains):
  from flax import nnx
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, num_chains=num_chains))


@pytest.fixture(scope="session")
def full_forward():
  """forward(model, tokens [B, T], num_chains=None) -> numpy logits [B, T, V] (jit, cached)."""
  def forward(model, tokens, num_chains=None):
    from flax import nnx
    graphdef, state = nnx.split(model)
    return np.asarray(_forward_fn(graphdef, num_chains)(state, jnp.asarray(tokens)))
  return forward


def run_on_cpu_devices(code: str, *args: str, n: int = 8, timeout: int = 600) -> str:
  """Runs `code` (with sys.argv[1:] = args) in a fresh Python with n simulated CPU devices (XLA
  reads the device count when jax starts, so it cannot change in this process); returns its
  stdout, failing the test with stdout and stderr when it exits non-zero."""
  import os
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
  r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=repo, capture_output=True,
                     text=True, timeout=timeout)
  if r.returncode:
    pytest.fail(f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}")
  return r.stdout


@pytest.fixture(scope="session")
def cpu_devices():
  """run(code, *args, n=8) -> stdout of code run with n simulated CPU devices
  (run_on_cpu_devices)."""
  return run_on_cpu_devices


# --- Hugging Face LLaMA-family folders written the way transformers saves them ---------------

HF_TINY = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=320,
                  hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=10, intermediate_size=56, rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=False,
                  hidden_act="silu", eos_token_id=0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=320,
                  hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=44, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True,
                  hidden_act="silu", use_sliding_window=False, sliding_window=None,
                  eos_token_id=0),
}


def hf_tensors(hf: dict, seed: int) -> dict[str, np.ndarray]:
  """Random float32 weights of a LLaMA-family config in the Hugging Face naming ([out, in])."""
  rng = np.random.default_rng(seed)
  d, v, f = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
  h, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  e = hf.get("head_dim") or d // h
  qwen = hf["model_type"] == "qwen2"

  def w(*shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

  def norm(n):
    return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

  out = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32),
         "model.norm.weight": norm(d)}
  if not hf["tie_word_embeddings"]:
    out["lm_head.weight"] = w(v, d)
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out.update({p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight":
                norm(d), p + "self_attn.q_proj.weight": w(h * e, d),
                p + "self_attn.k_proj.weight": w(kv * e, d),
                p + "self_attn.v_proj.weight": w(kv * e, d),
                p + "self_attn.o_proj.weight": w(d, h * e), p + "mlp.gate_proj.weight": w(f, d),
                p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)})
    if qwen:
      for n, k in (("q", h), ("k", kv), ("v", kv)):
        out[p + f"self_attn.{n}_proj.bias"] = (0.3 * rng.standard_normal(k * e)).astype(
            np.float32)
  return out


def write_hf_folder(path, hf: dict, tensors: dict[str, np.ndarray], shards: int = 2):
  """config.json, `shards` safetensors files (+ index when > 1) and a byte-level BPE
  tokenizer.json, written with the safetensors and tokenizers packages."""
  import json
  from pathlib import Path

  import tokenizers
  from safetensors.numpy import save_file
  from tokenizers import decoders, models, pre_tokenizers, trainers
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf))
  names = list(tensors)
  if shards == 1:
    save_file(tensors, str(path / "model.safetensors"))
  else:
    wmap = {}
    for i in range(shards):
      fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: tensors[n] for n in names[i::shards]}
      save_file(part, str(path / fname), metadata={"format": "pt"})
      wmap.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": wmap}))
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["def main(x):\n    return x + 1\n"] * 20, trainer=trainers.BpeTrainer(
      vocab_size=290, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.save(str(path / "tokenizer.json"))
  return path


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
  """make(kind, seed=0, shards=2, **config overrides) -> (folder, config dict, tensors)."""
  def make(kind: str, seed: int = 0, shards: int = 2, **overrides):
    hf = {**HF_TINY[kind], **overrides}
    tensors = hf_tensors(hf, seed)
    root = tmp_path_factory.mktemp(f"hf_{kind}")
    return write_hf_folder(root / "model", hf, tensors, shards), hf, tensors
  return make


# --- tiny training runs ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """A small text folder: a few 'files' of generated Python-like text."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "value", "for", "in", "range", "if", "else", "print", "x",
           "y", "data", "items", "class", "import", "None", "True", "(", ")", ":", "=", "+"]
  for i in range(12):
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 10))) for _ in range(300)]
    (root / f"f{i:02d}.py").write_text("\n".join(lines))
  return root


def _tiny_config(tmp_path, corpus, name: str = "run", *extra: str):
  from experiments.config import load_config
  return load_config(None, [
      f"name={name}", f"out_dir={tmp_path / 'runs'}", "model.preset=tiny", "model.vocab_size=320",
      "model.max_seq_len=32", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
      "steps=6", "batch_size=4", "seq_len=32", "warmup_steps=2", "log_every=1", "eval_every=3",
      "eval_batches=2", "save_every=3", "sample_tokens=4", *extra])


@pytest.fixture(scope="session")
def tiny_config():
  """make(tmp_path, corpus, name='run', *overrides) -> the TrainConfig of a 6-step tiny run."""
  return _tiny_config


# Press inputs (kvcache presses and mpc's MPCache) ---------------------------------------------

def _press_inputs(seed, *, b=2, n_layers=4, kv=2, g=3, n=40, w=8, lengths=(40, 29)):
  """(cache, scores, lengths): a prefill-like cache (slot n holds position n while n < length,
  else empty; random K / V) and random window probabilities [B, K, G, W, N] per layer."""
  import dataclasses

  import jax.numpy as jnp

  from colm.config import ModelConfig
  from kvcache.cache import HeadGroup, init_cache
  rng = np.random.default_rng(seed)
  cfg = ModelConfig.tiny(n_layers=n_layers, n_kv_heads=kv, n_heads=kv * g, head_dim=8)
  cache = init_cache(cfg, b, n)
  lengths = np.asarray(lengths[:b], np.int32)
  pos = np.where(np.arange(n)[None] < lengths[:, None], np.arange(n)[None], -1)
  pos = np.broadcast_to(pos[:, None], (b, kv, n)).astype(np.int32)
  layers, scores = [], []
  for layer in cache.layers:
    k, v = (jnp.asarray(rng.standard_normal((b, kv, n, 8)), jnp.float32) for _ in range(2))
    layers.append(dataclasses.replace(layer, groups=(HeadGroup(k, v, jnp.asarray(pos)),)))
    logits = rng.standard_normal((b, kv, g, w, n)) * 2
    logits = np.where(pos[:, :, None, None] >= 0, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    scores.append((jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32),))
  return dataclasses.replace(cache, layers=tuple(layers), lengths=jnp.asarray(lengths)), \
      tuple(scores), lengths


def _kept_positions(cache, layer, b, h):
  """The positions a compressed cache holds for (layer, sequence, KV head), as a set."""
  g = cache.layers[layer].groups
  heads = [(grp, h0) for grp, (h0, h1) in zip(g, cache.layers[layer].head_ranges())
           if h0 <= h < h1]
  grp, h0 = heads[0]
  p = np.asarray(grp.pos[b, h - h0])
  return set(p[p >= 0].tolist())


@pytest.fixture
def press_inputs():
  """press_inputs(seed, **shape) -> (cache, scores, lengths); see _press_inputs."""
  return _press_inputs


@pytest.fixture
def kept_positions():
  """kept_positions(cache, layer, b, h) -> set of positions held."""
  return _kept_positions


# Host buffers handed to the device (kvcache.host.to_device) ------------------------------------

class _RecordingJnp:
  """A module's jnp whose asarray / array record the NumPy buffers they are handed."""

  def __init__(self, jnp_module, record):
    self._jnp, self._record = jnp_module, record

  def __getattr__(self, name):
    return getattr(self._jnp, name)

  def asarray(self, x, *args, **kw):
    self._record(x)
    return self._jnp.asarray(x, *args, **kw)

  def array(self, x, *args, **kw):
    self._record(x)
    return self._jnp.array(x, *args, **kw)


class HostTransfers:
  """Records every NumPy buffer handed to the device through watched modules, with its value
  then: their `jnp.asarray` / `jnp.array` (watch_jnp), and NumPy arrays passed straight to their
  jitted functions (watch_calls; a jit call transfers its NumPy arguments too). On CPU the
  transfer may read the buffer after the call returned, while the dispatched step still runs, so
  a buffer written afterwards may reach the device changed (kvcache.host.to_device)."""

  def __init__(self, monkeypatch):
    self._patch, self.handed = monkeypatch, []

  def record(self, x):
    if isinstance(x, np.ndarray):
      self.handed.append((x, x.copy()))

  def watch_jnp(self, *modules):
    for m in modules:
      self._patch.setattr(m, "jnp", _RecordingJnp(m.jnp, self.record))

  def watch_calls(self, module, *names):
    for name in names:
      fn = getattr(module, name)

      def call(*args, fn=fn, **kw):
        for x in jax.tree_util.tree_leaves((args, kw)):
          self.record(x)
        return fn(*args, **kw)

      self._patch.setattr(module, name, call)

  def written(self) -> list[int]:
    """Indices of the handed buffers whose value changed after they were handed over."""
    return [i for i, (x, then) in enumerate(self.handed) if not np.array_equal(x, then)]


@pytest.fixture
def host_transfers(monkeypatch):
  """A HostTransfers recorder (its patches undone after the test)."""
  return HostTransfers(monkeypatch)
