"""Hugging Face import / export: logits against a float64 NumPy LLaMA (full forward, prefill and
cached decode), a bit-exact round trip, transformers when installed, and one-line errors."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cli import main as cli_main
from experiments.hf import HFError, export_hf, import_hf
from experiments.train import load_run

SEED = 0


def _np_inv_freq(hf: dict, e: int) -> np.ndarray:
  """RoPE inverse frequencies, with Llama 3.1's scaling as transformers computes it."""
  inv = 1.0 / hf["rope_theta"] ** (np.arange(0, e, 2, dtype=np.float64) / e)
  sc = hf.get("rope_scaling")
  if not sc:
    return inv
  factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
  old = sc["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  out = np.where(wavelen > old / lo, inv / factor, inv)
  smooth = (old / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * out / factor + smooth * out
  medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
  return np.where(medium, smoothed, out)


def numpy_llama(hf: dict, t: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
  """An independent float64 LLaMA / Qwen2 forward on HF-named weights: [B, T] -> [B, T, V]."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  d, h, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
  e = hf.get("head_dim") or d // h
  b, n = tokens.shape
  inv = _np_inv_freq(hf, e)
  ang = np.arange(n)[:, None] * inv[None]  # [T, E/2]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + hf["rms_norm_eps"]) * w

  def rot(x):  # [B, T, N, E]
    x1, x2 = x[..., : e // 2], x[..., e // 2:]
    return x * cos[None, :, None] + np.concatenate([-x2, x1], -1) * sin[None, :, None]

  def proj(x, name):
    y = x @ t[name + ".weight"].T
    return y + t[name + ".bias"] if name + ".bias" in t else y

  x = t["model.embed_tokens.weight"][tokens]
  mask = np.tril(np.ones((n, n), bool))
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    a = rms(x, t[p + "input_layernorm.weight"])
    q = rot(proj(a, p + "self_attn.q_proj").reshape(b, n, h, e))
    k = rot(proj(a, p + "self_attn.k_proj").reshape(b, n, kv, e))
    v = proj(a, p + "self_attn.v_proj").reshape(b, n, kv, e)
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(e)
    s = np.where(mask, s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhe->bqhe", pr, v).reshape(b, n, h * e)
    x = x + o @ t[p + "self_attn.o_proj.weight"].T
    m = rms(x, t[p + "post_attention_layernorm.weight"])
    g, u = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
    x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
  x = rms(x, t["model.norm.weight"])
  head = t["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else t["lm_head.weight"]
  return x @ head.T


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def imported(request, hf_folder, tmp_path_factory):
  folder, hf, tensors = hf_folder(request.param, seed=SEED)
  out = import_hf(folder, tmp_path_factory.mktemp("runs") / request.param, progress=False)
  return request.param, folder, hf, tensors, out


def test_logits_match_numpy_llama_full_prefill_and_decode(imported):
  from flax import nnx

  from kvcache import decode_step, init_cache, prefill
  kind, _, hf, tensors, out = imported
  print(f"seed {SEED}, {kind}")
  _, model, _, _ = load_run(out)
  tokens = np.random.default_rng(SEED).integers(0, hf["vocab_size"], (2, 13))
  want = numpy_llama(hf, tensors, tokens)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want, rtol=1e-5, atol=1e-5)
  # Prefill the first 9 tokens, then decode the rest one at a time through the cache.
  graphdef, params = nnx.split(model)
  cache = init_cache(model.cfg, 2, 32)
  logits, cache = prefill(graphdef, params, jnp.asarray(tokens[:, :9]), jnp.full((2,), 9),
                          cache)
  np.testing.assert_allclose(np.asarray(logits), want[:, :9], rtol=1e-5, atol=1e-5)
  for i in range(9, 13):
    logits, cache = decode_step(graphdef, params, jnp.asarray(tokens[:, i]), cache)
    np.testing.assert_allclose(np.asarray(logits).reshape(2, -1), want[:, i], rtol=1e-5,
                               atol=1e-5, err_msg=f"decode position {i}")


def test_export_then_import_is_bit_exact(imported, tmp_path):
  from safetensors.numpy import load_file
  kind, _, hf, tensors, out = imported
  exported = export_hf(out, tmp_path / "hf", shard_bytes=20_000, progress=False)
  index = json.loads((exported / "model.safetensors.index.json").read_text())
  back = {}
  for f in sorted(set(index["weight_map"].values())):
    back.update(load_file(str(exported / f)))
  assert sorted(back) == sorted(tensors)
  for k, x in tensors.items():
    np.testing.assert_array_equal(back[k], x, err_msg=k)
  again = import_hf(exported, tmp_path / "again", progress=False)
  from colm.params import split_params
  a = split_params(load_run(out)[1])[1]
  b = split_params(load_run(again)[1])[1]
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  cfg = json.loads((exported / "config.json").read_text())
  assert cfg["architectures"] == hf["architectures"]


def test_cli_import_eval_generate_export(hf_folder, tmp_path, capsys):
  folder, _, _ = hf_folder("qwen2", seed=1, shards=1)
  run = tmp_path / "q"
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(4):
    (corpus / f"f{i}.py").write_text("def main(x):\n    return x + 1\n" * 40)
  assert cli_main(["import", str(folder), "--out", str(run), "--no-progress"]) == 0
  assert cli_main(["generate", str(run), "--prompt", "def main", "--max-new-tokens", "4",
                   "--no-progress"]) == 0
  assert cli_main(["eval", str(run), f"data.source={corpus}", f"data.cache_dir={tmp_path / 'c'}",
                   "data.val_fraction=0.5", "seq_len=8", "batch_size=2", "--batches", "1",
                   "--no-progress"]) == 0
  assert "perplexity" in capsys.readouterr().out
  assert cli_main(["eval", str(run), "model.d_model=48"]) == 2
  assert "model.d_model: stored 36, requested 48" in capsys.readouterr().err
  assert cli_main(["export", str(run), "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
  assert (tmp_path / "hf" / "model.safetensors").is_file()


def _edit(folder, name, fn):
  p = folder / name
  p.write_text(json.dumps(fn(json.loads(p.read_text()))))


@pytest.mark.parametrize("case,match", [
    ("no_config", "no config.json"),
    ("architecture", "architecture 'GPT2LMHeadModel' is not supported"),
    ("missing_shard", r"names shard model-00002-of-00002.safetensors, which is missing"),
    ("wrong_shape", r"model-0000\d-of-00002.safetensors: tensor model.layers.0.mlp.up_proj.weight "
                    r"has shape \[56, 41\]"),
    ("rope", "rope_scaling type 'yarn' is not supported"),
    ("no_tensor", "tensor model.norm.weight is in no shard"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, match, hf_folder, tmp_path):
  folder, hf, tensors = hf_folder("llama", seed=2)
  if case == "no_config":
    (folder / "config.json").unlink()
  elif case == "architecture":
    _edit(folder, "config.json", lambda c: {**c, "architectures": ["GPT2LMHeadModel"]})
  elif case == "missing_shard":
    (folder / "model-00002-of-00002.safetensors").unlink()
  elif case == "wrong_shape":
    from experiments.safetensors_io import write_file
    bad = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": np.zeros((56, 41), np.float32)})
    idx = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = idx["model.layers.0.mlp.up_proj.weight"]
    write_file(folder / shard, {k: bad[k] for k, f in idx.items() if f == shard})
  elif case == "rope":
    _edit(folder, "config.json", lambda c: {**c, "rope_scaling": {"rope_type": "yarn",
                                                                  "factor": 2.0}})
  elif case == "no_tensor":
    _edit(folder, "model.safetensors.index.json", lambda c: {**c, "weight_map": {
        k: v for k, v in c["weight_map"].items() if k != "model.norm.weight"}})
  with pytest.raises(HFError, match=match) as info:
    import_hf(folder, tmp_path / "out", progress=False)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob(".out*"))


def test_truncated_shard_is_one_line_error(hf_folder, tmp_path, capsys):
  folder, _, _ = hf_folder("llama", seed=3)
  shard = folder / "model-00001-of-00002.safetensors"
  shard.write_bytes(shard.read_bytes()[:-100])
  assert cli_main(["import", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "truncated" in err and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_logits_match_transformers(hf_folder, tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed: the comparison with "
                              "Hugging Face transformers is skipped")
  transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                     "the comparison with Hugging Face is skipped")
  for kind in ("llama", "qwen2"):
    folder, hf, _ = hf_folder(kind, seed=4)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    tokens = np.random.default_rng(4).integers(0, hf["vocab_size"], (2, 11))
    with torch.no_grad():
      want = ref(torch.tensor(tokens)).logits.numpy()
    _, model, _, _ = load_run(import_hf(folder, tmp_path / kind, progress=False))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want, rtol=1e-4,
                               atol=1e-4, err_msg=kind)


def test_progressive_stages_start_from_an_imported_run(imported, corpus, tmp_path):
  """stages[0].init_from = an imported LLaMA run (taken as it is, steps 0), then a chain is
  added and trained with chain 1 frozen: the grown model's 1-chain sub-model is still exactly
  the imported model (CoLM's expansion of an existing LLaMA by a chain)."""
  from experiments.config import load_config
  from experiments.progressive import train_progressive
  kind, _, hf, _, out = imported
  if kind != "llama":
    pytest.skip("one architecture is enough for the stage plumbing")
  yaml = tmp_path / "grow.yaml"
  yaml.write_text(
      f"name: grown\nout_dir: {tmp_path / 'runs'}\ndata:\n  source: {corpus}\n"
      f"  cache_dir: {tmp_path / 'cache'}\nsteps: 2\nbatch_size: 2\nseq_len: 16\n"
      "warmup_steps: 0\nlog_every: 1\neval_every: 2\neval_batches: 1\nsave_every: 2\n"
      f"sample_tokens: 2\nstages:\n  - init_from: {out}\n    steps: 0\n"
      "  - add_chain: 40\n    steps: 2\n")
  cfg = load_config(yaml, [])
  result = train_progressive(cfg, progress=False)
  assert [s["chains"] for s in result["stages"]] == [[1], [1, 1]]
  _, grown, _, _ = load_run(tmp_path / "runs" / "grown" / "stage1")
  _, base, _, _ = load_run(out)
  tokens = jnp.asarray(np.random.default_rng(SEED).integers(0, hf["vocab_size"], (2, 11)))
  np.testing.assert_allclose(np.asarray(grown(tokens, num_chains=1)), np.asarray(base(tokens)),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(grown(tokens)), np.asarray(base(tokens)), atol=1e-3)
