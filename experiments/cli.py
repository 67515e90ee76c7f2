"""The command line: python -m experiments train|eval|generate|bench|list.

    python -m experiments train quickstart                   # train (or resume) a config
    python -m experiments train quickstart steps=50 name=q2  # with key=value overrides
    python -m experiments eval runs/quickstart                # validation loss per chain scale
    python -m experiments generate runs/quickstart --prompt "def main(" --max-new-tokens 64
    python -m experiments extract runs/colm --chains 1 --out runs/colm_c1   # CoLM sub-model
    python -m experiments bench train --preset base           # benchmarks write results/*.json
    python -m experiments list                                # configs, benchmarks, runs
    python -m experiments config quickstart                   # the resolved config, typed keys
    python -m experiments import ~/models/Qwen2.5-0.5B --out runs/qwen05   # HF safetensors
    python -m experiments export runs/qwen05 --out /tmp/qwen05_hf
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

BENCHMARKS = {
    "train": "experiments.bench_train",
    "decode": "experiments.bench_decode",
    "prefill": "experiments.bench_prefill",
    "paged": "experiments.bench_paged",
    "batch": "experiments.bench_batch",
    "press": "experiments.bench_press",
    "mpc": "experiments.bench_mpc",
    "search": "experiments.bench_search",
    "attention": "experiments.bench_attention",
    "colm": "experiments.bench_colm",
    "s2": "experiments.bench_s2",
    "triton": "experiments.bench_triton",
}
TOOLS = {"report": "experiments.report"}


def _cmd_train(args) -> int:
  from experiments.config import load_config
  from experiments.train import train
  if args.distributed:  # several processes: coordinator and ids from flags, env or the cluster
    from experiments.distributed import initialize
    initialize(args.coordinator, args.num_processes, args.process_id)
  cfg = load_config(args.config, args.overrides)
  out = train(cfg, stop_after=args.stop_after, progress=not args.no_progress)
  val = out.get("val_loss")
  print(f"validation loss {'none yet' if val is None else f'{val:.4f}'} at step {out['step']} "
        f"(run folder {out['run_dir']})")
  import jax
  if cfg.sample_tokens and out["step"] > 0 and jax.process_count() == 1:
    # (With several processes the parameters span hosts; `generate` a sample from the run
    # folder afterwards.)
    from kvcache import generate
    data = out["data"]
    model = out["trainer"].model(out["params"])
    prompt = data.encode(cfg.sample_prompt)
    n = min(cfg.sample_tokens, model.cfg.max_seq_len - len(prompt))
    new = generate(model, [prompt], max_new_tokens=n, stop_tokens=[data.eot_id])[0]
    print(f"sample:\n{cfg.sample_prompt}{data.decode(new)}")
  return 0


def _run_dir(arg: str, overrides: list[str]) -> Path:
  from experiments.config import load_config
  p = Path(arg)
  if not (p / "config.yaml").is_file():
    cfg = load_config(arg, overrides)
    p = Path(cfg.out_dir) / cfg.name
  stages = load_config(p / "config.yaml").stages if (p / "config.yaml").is_file() else []
  return p / f"stage{len(stages) - 1}" if stages else p  # a progressive run: its last stage


def _cmd_eval(args) -> int:
  import numpy as np
  from tqdm.auto import tqdm

  from experiments.config import ConfigError, config_diff, load_config
  from experiments.train import Trainer, load_run, prepare_data
  run_dir = _run_dir(args.target, args.overrides)
  stored = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
  if stored is not None:
    cfg = load_config(run_dir / "config.yaml", args.overrides)
    if diff := config_diff(stored, cfg, model_only=True):
      raise ConfigError(f"eval cannot change the model of {run_dir}: {'; '.join(diff)}")
  cfg, model, _, step = load_run(run_dir, args.step)
  cfg = load_config(run_dir / "config.yaml", args.overrides)
  data = prepare_data(cfg, progress=False)
  from colm.params import split_params
  _, params, _ = split_params(model)
  n = model.cfg.num_chains
  batches = args.batches or cfg.eval_batches
  print(f"run {run_dir} at step {step}, {batches} validation batches of {cfg.batch_size}x"
        f"{cfg.seq_len}")
  from experiments.train import make_loss_fn
  trainer = Trainer(cfg)
  for k in range(1, n + 1):
    import jax
    fn = jax.jit(make_loss_fn(trainer.codec, num_chains=k))
    losses = [float(fn(params, np.asarray(data.batch("val", i, cfg.batch_size, cfg.seq_len,
                                                       cfg.seed), np.int32)))
              for i in tqdm(range(batches), desc=f"eval chains 1..{k}", unit="batch",
                            leave=False, disable=args.no_progress)]
    val = float(np.mean(losses))
    print(f"chains 1..{k}: val loss {val:.4f}  perplexity {math.exp(min(val, 50)):.2f}")
  return 0


def _stop_tokens(run_dir: Path, tok) -> list[int]:
  """An imported model's eos ids (import.json), else the tokenizer's end-of-text token."""
  import json

  from experiments.data import eot_token_id
  info = run_dir / "import.json"
  if info.is_file() and json.loads(info.read_text()).get("eos_token_ids"):
    return list(json.loads(info.read_text())["eos_token_ids"])
  eot = eot_token_id(tok)
  return [] if eot is None else [eot]


def _cmd_generate(args) -> int:
  from tqdm.auto import tqdm

  from experiments.train import load_run
  from kvcache import SamplingConfig, generate
  cfg, model, tok, step = load_run(args.run_dir, args.step)
  prompts = [tok.encode(p, add_special_tokens=False).ids or tok.encode(p).ids
             for p in args.prompt]
  sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
  # One compiled loop decodes every token (kvcache.decode_loop), so the bar moves once, when it
  # returns, by the tokens generated; its rate is the real decode throughput.
  with tqdm(total=len(prompts) * args.max_new_tokens, desc="generate", unit="tok",
            disable=args.no_progress) as bar:
    outs = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                    seed=args.seed, stop_tokens=_stop_tokens(Path(args.run_dir), tok),
                    num_chains=args.chains)
    bar.update(sum(len(o) for o in outs))
  for p, o in zip(args.prompt, outs):
    print(p + tok.decode(o))
    print("-" * 40)
  return 0


def _cmd_extract(args) -> int:
  from experiments.progressive import extract_run
  out = extract_run(args.run_dir, args.chains, args.out)
  print(f"wrote the {args.chains}-chain sub-model of {args.run_dir} to {out}")
  return 0


def _cmd_import(args) -> int:
  from experiments.hf import import_hf
  out = import_hf(args.path, args.out, dtype=args.dtype, max_seq_len=args.max_seq_len,
                  progress=not args.no_progress)
  print(f"imported {args.path} into the run folder {out}")
  return 0


def _cmd_export(args) -> int:
  from experiments.hf import export_hf
  out = export_hf(args.run_dir, args.out, step=args.step, shard_bytes=args.shard_mb << 20,
                  progress=not args.no_progress)
  print(f"exported {args.run_dir} to {out}")
  return 0


def _cmd_config(args) -> int:
  from experiments.config import describe, load_config, to_yaml
  cfg = load_config(args.config, args.overrides)
  print(to_yaml(cfg).rstrip())
  print("\n# keys (type, resolved value); override any with key=value:")
  print(describe(cfg))
  return 0


def _cmd_bench(args) -> int:
  if args.name not in BENCHMARKS:
    raise SystemExit(f"unknown benchmark {args.name!r}; known: {', '.join(sorted(BENCHMARKS))}")
  mod = importlib.import_module(BENCHMARKS[args.name])
  mod.main(args.rest)
  return 0


def _cmd_list(args) -> int:
  from experiments.config import list_configs
  print("configs:    " + ", ".join(list_configs()))
  print("benchmarks: " + ", ".join(sorted(BENCHMARKS)))
  runs = sorted(p.parent.name for p in Path(args.out_dir).glob("*/config.yaml"))
  print("runs:       " + (", ".join(runs) if runs else "(none)"))
  return 0


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """Keeps the module docstring's layout and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                               formatter_class=_Formatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  _add = sub.add_parser
  sub.add_parser = lambda *a, **k: _add(*a, formatter_class=_Formatter, **k)  # noqa: E731
  step_help = "checkpoint step to use; None: the newest that passes verification"
  t = sub.add_parser("train", help="train or resume a run")
  t.add_argument("config", help="config name under experiments/configs/ or a YAML path")
  t.add_argument("overrides", nargs="*", help="key=value overrides")
  t.add_argument("--stop-after", type=int, default=None, help="stop at this step (for tests)")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  t.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() first (several processes or hosts; see "
                      "experiments/distributed.py)")
  t.add_argument("--coordinator", default=None,
                 help="with --distributed: process 0's host:port (else $JAX_COORDINATOR_ADDRESS "
                      "or the cluster's)")
  t.add_argument("--num-processes", type=int, default=None,
                 help="with --distributed: processes in all (else $JAX_NUM_PROCESSES)")
  t.add_argument("--process-id", type=int, default=None,
                 help="with --distributed: this process, 0..N-1 (else $JAX_PROCESS_ID)")
  t.set_defaults(fn=_cmd_train)
  e = sub.add_parser("eval", help="validation loss and perplexity per chain scale")
  e.add_argument("target", help="run folder, or a config whose run folder to evaluate")
  e.add_argument("overrides", nargs="*", help="key=value overrides (data, batch_size ...; "
                 "not the model)")
  e.add_argument("--batches", type=int, default=0, help="validation batches (0: eval_batches)")
  e.add_argument("--step", type=int, default=None, help=step_help)
  e.add_argument("--no-progress", action="store_true", help="no progress bar")
  e.set_defaults(fn=_cmd_eval)
  g = sub.add_parser("generate", help="sample from a trained run")
  g.add_argument("run_dir", help="a run folder (trained, extracted or imported)")
  g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  g.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt")
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  g.add_argument("--top-k", type=int, default=0, help="0: off")
  g.add_argument("--top-p", type=float, default=1.0, help="1: off")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")
  g.add_argument("--chains", type=int, default=None, help="decode with the first k chains")
  g.add_argument("--step", type=int, default=None, help=step_help)
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  g.set_defaults(fn=_cmd_generate)
  x = sub.add_parser("extract", help="save a CoLM run's first k chains as a standalone run")
  x.add_argument("run_dir", help="a CoLM run folder")
  x.add_argument("--chains", type=int, required=True, help="k: keep chains 1..k")
  x.add_argument("--out", required=True, help="the new run folder")
  x.set_defaults(fn=_cmd_extract)
  i = sub.add_parser("import", help="a Hugging Face LLaMA / Mistral / Qwen2 folder -> a run")
  i.add_argument("path", help="folder with config.json, *.safetensors (+ index), tokenizer.json")
  i.add_argument("--out", required=True, help="the new run folder (must not exist)")
  i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="parameter and compute dtype of the run")
  i.add_argument("--max-seq-len", type=int, default=None,
                 help="longest context (default: the model's, capped by a sliding window)")
  i.add_argument("--no-progress", action="store_true", help="no progress bar")
  i.set_defaults(fn=_cmd_import)
  o = sub.add_parser("export", help="a 1-chain run -> a Hugging Face safetensors folder")
  o.add_argument("run_dir", help="a run folder")
  o.add_argument("--out", required=True, help="the new folder (must not exist)")
  o.add_argument("--step", type=int, default=None, help=step_help)
  o.add_argument("--shard-mb", type=int, default=2048, help="largest shard in MiB")
  o.add_argument("--no-progress", action="store_true", help="no progress bar")
  o.set_defaults(fn=_cmd_export)
  c = sub.add_parser("config", help="print a config resolved, and its keys with their types")
  c.add_argument("config", help="config name under experiments/configs/ or a YAML path")
  c.add_argument("overrides", nargs="*", help="key=value overrides")
  c.set_defaults(fn=_cmd_config)
  b = sub.add_parser("bench", help="run a benchmark (writes JSON)")
  b.add_argument("name", help=", ".join(sorted(BENCHMARKS)))
  b.add_argument("rest", nargs=argparse.REMAINDER)
  b.set_defaults(fn=_cmd_bench)
  r = sub.add_parser("report", help="regenerate the README's result tables from results/*.json")
  r.add_argument("rest", nargs=argparse.REMAINDER)
  r.set_defaults(fn=lambda a: importlib.import_module(TOOLS["report"]).main(a.rest) or 0)
  lst = sub.add_parser("list", help="configs, benchmarks and runs")
  lst.add_argument("--out-dir", default="runs", help="where runs live")
  lst.set_defaults(fn=_cmd_list)
  return ap


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["report"]:  # its own flags (--check, --print) pass through untouched
    return importlib.import_module(TOOLS["report"]).main(argv[1:]) or 0
  if argv[:1] == ["bench"] and len(argv) > 1:
    return _cmd_bench(argparse.Namespace(name=argv[1], rest=argv[2:]))
  args = build_parser().parse_args(argv)
  from experiments.checkpoint import CheckpointError
  from experiments.config import ConfigError
  from experiments.train import TrainingDiverged
  try:
    return args.fn(args)
  except (ConfigError, CheckpointError, TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # bad input found before any work (prompt too long, empty corpus ...)
    print(f"error: {e}", file=sys.stderr)
    return 2
