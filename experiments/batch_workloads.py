"""Shared-prefix request batches for BatchLLM: seeded generators of `Request` lists.

Shapes (token ids drawn uniformly from range(vocab) minus the `stop` ids):
- `shared_prefix`: SGLang's generated-shared-prefix benchmark: `groups` system prompts of
  `prefix` tokens, each followed by `per_group` questions of `question` tokens.
- `micro`: BatchLLM's microbenchmark: `groups` prefixes of `prefix` tokens, each shared by
  `sharing` requests with `suffix` distinct tokens.
- `multi_level`: a system prompt, then documents under it, then questions on each document.
Within a group the first token after the shared part is never the same for all members (and
distinct groups' shared parts differ), so a group shares exactly its prefix. Requests come in
group order; `shuffled` and `mixed_outputs` make the other submission orders and decode budgets.

    requests = shared_prefix(groups=8, per_group=4, prefix=64, question=8)
    toy = scaled("micro", 0.01, groups=3)   # every length x 0.01 (at least 1)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np

from kvcache.batchllm import Request


def _alphabet(vocab: int, stop: Sequence[int]) -> np.ndarray:
  ids = np.setdiff1d(np.arange(vocab), np.asarray(stop, np.int64))
  if len(ids) < 2:
    raise ValueError(f"vocab={vocab} without stop={tuple(stop)} leaves {len(ids)} token ids")
  return ids


def _distinct_stems(rng, ids, count: int, length: int, taken: set | None = None) -> list[list]:
  """count token lists of `length` drawn from ids, pairwise distinct (and not in `taken`)."""
  if count > len(ids) ** length:
    raise ValueError(f"cannot draw {count} distinct {length}-token stems from {len(ids)} ids")
  seen, out = set(taken or ()), []
  while len(out) < count:
    s = tuple(rng.choice(ids, length).tolist())
    if s not in seen:
      seen.add(s)
      out.append(list(s))
  return out


def _tails(rng, ids, count: int, length: int, distinct: bool = False) -> list[list]:
  """count token lists of `length` whose first tokens are not all equal (when count > 1), and
  pairwise distinct when `distinct`."""
  if distinct and count > len(ids) ** length:
    raise ValueError(f"cannot draw {count} distinct {length}-token lists from {len(ids)} ids")
  while True:
    tails = rng.choice(ids, (count, length))
    if count > 1 and (tails[:, 0] == tails[0, 0]).all():
      continue
    if not distinct or len(np.unique(tails, axis=0)) == count:
      return tails.tolist()


def _check(**sizes: int) -> None:
  for name, v in sizes.items():
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")


def shared_prefix(groups: int = 64, per_group: int = 16, prefix: int = 2048, question: int = 128,
                  output: int = 256, vocab: int = 256, seed: int = 0,
                  stop: Sequence[int] = ()) -> list[Request]:
  """groups * per_group requests: a group's prompts are its `prefix`-token system prompt plus a
  `question`-token question; each decodes up to `output` tokens."""
  _check(groups=groups, per_group=per_group, prefix=prefix, question=question, output=output)
  rng = np.random.default_rng(seed)
  ids = _alphabet(vocab, stop)
  out = []
  for stem in _distinct_stems(rng, ids, groups, prefix):
    out += [Request(stem + q, output, tuple(stop)) for q in _tails(rng, ids, per_group, question)]
  return out


def micro(groups: int = 64, sharing: int = 16, prefix: int = 2000, suffix: int = 200,
          output: int = 100, vocab: int = 256, seed: int = 0,
          stop: Sequence[int] = ()) -> list[Request]:
  """groups * sharing requests: `sharing` requests per `prefix`-token prefix, each with its own
  `suffix` tokens, decoding up to `output` tokens (BatchLLM's microbenchmark)."""
  _check(groups=groups, sharing=sharing, prefix=prefix, suffix=suffix, output=output)
  return shared_prefix(groups, sharing, prefix, suffix, output, vocab, seed, stop)


def multi_level(systems: int = 2, docs_per_system: int = 4, questions_per_doc: int = 8,
                system_len: int = 512, doc_len: int = 1024, question_len: int = 64,
                output: int = 128, vocab: int = 256, seed: int = 0,
                stop: Sequence[int] = ()) -> list[Request]:
  """systems * docs_per_system * questions_per_doc requests: system prompt + document +
  question, so documents share a system prompt and questions share system prompt + document."""
  _check(systems=systems, docs_per_system=docs_per_system, questions_per_doc=questions_per_doc,
         system_len=system_len, doc_len=doc_len, question_len=question_len, output=output)
  rng = np.random.default_rng(seed)
  ids = _alphabet(vocab, stop)
  out = []
  for sys_prompt in _distinct_stems(rng, ids, systems, system_len):
    for doc in _tails(rng, ids, docs_per_system, doc_len, distinct=True):
      out += [Request(sys_prompt + doc + q, output, tuple(stop))
              for q in _tails(rng, ids, questions_per_doc, question_len)]
  return out


def shuffled(requests: Sequence[Request], seed: int = 0) -> list[Request]:
  """The same requests in a seeded random submission order."""
  perm = np.random.default_rng(seed).permutation(len(requests))
  return [requests[i] for i in perm]


def mixed_outputs(requests: Sequence[Request], low: int = 16, high: int = 512,
                  seed: int = 0) -> list[Request]:
  """The same prompts with max_new_tokens drawn uniformly from [low, high]."""
  _check(low=low)
  if high < low:
    raise ValueError(f"high={high} < low={low}")
  outs = np.random.default_rng(seed).integers(low, high + 1, len(requests))
  return [dataclasses.replace(r, max_new_tokens=int(n)) for r, n in zip(requests, outs)]


WORKLOADS: dict[str, Callable[..., list[Request]]] = {
    "shared_prefix": shared_prefix,
    "micro": micro,
    "multi_level": multi_level,
}

# The token-length arguments `scaled` multiplies (counts, vocab and seed are left alone).
LENGTH_ARGS = {
    "shared_prefix": ("prefix", "question", "output"),
    "micro": ("prefix", "suffix", "output"),
    "multi_level": ("system_len", "doc_len", "question_len", "output"),
}


def scaled(name: str, scale: float = 1.0, **overrides) -> list[Request]:
  """WORKLOADS[name] with every token length times `scale` (rounded up, at least 1), then the
  keyword overrides (any argument of the generator, e.g. groups=3 or prefix=10)."""
  if name not in WORKLOADS:
    raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
  if scale <= 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  fn = WORKLOADS[name]
  params = inspect.signature(fn).parameters
  unknown = set(overrides) - set(params)
  if unknown:
    raise ValueError(f"{name} has no arguments {sorted(unknown)}; it takes {list(params)}")
  kw = {a: max(1, math.ceil(params[a].default * scale)) for a in LENGTH_ARGS[name]}
  return fn(**{**kw, **overrides})
