"""The batch engine: the same greedy tokens under every scheduler (and as each prompt alone),
no request lost or duplicated when the page budget forces waiting, every page free at the end,
bad requests answered with an error while the others complete."""

import numpy as np
import pytest

from colm.config import ModelConfig
from kvcache import generate
from kvcache.batchllm import BatchLLM, Request
from kvcache.engine import FCFS, LPM, Engine, EngineConfig

CFG = ModelConfig.tiny(d_model=45, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=53,
                       max_seq_len=96, n_layers=2)
SCHEDULERS = [FCFS, LPM, lambda: LPM(fallback=None), BatchLLM, lambda: BatchLLM(reorder=False)]


@pytest.fixture(scope="module")
def model(spread_decoder):
  return spread_decoder(CFG, 23)


def _requests(seed, groups=3, per=3, stem=13, stop=()):
  """Groups sharing a stem (one stem shared by two groups' first tokens), mixed lengths."""
  rng = np.random.default_rng(seed)
  system = rng.integers(0, CFG.vocab_size, 5).tolist()
  out = []
  for _ in range(groups):
    s = system + rng.integers(0, CFG.vocab_size, stem).tolist()
    out += [Request(s + rng.integers(0, CFG.vocab_size, rng.integers(1, 12)).tolist(),
                    int(rng.integers(2, 7)), stop) for _ in range(per)]
  order = rng.permutation(len(out))
  return [out[i] for i in order]


def _engine(model, **kw):
  base = dict(num_pages=64, page_size=4, token_budget=24, chunk=8, max_running=6)
  return Engine(model, EngineConfig(**{**base, **kw}))


def test_every_scheduler_gives_each_prompt_alone_tokens(model):
  seed = 41
  print(f"seed={seed}")
  reqs = _requests(seed)
  alone = [generate(model, [list(r.prompt)], max_new_tokens=r.max_new_tokens, pad_to=16)[0]
           for r in reqs]
  for make in SCHEDULERS:
    sched = make()
    eng = _engine(model)
    outs, m = eng.run(reqs, sched, progress=False)
    assert [o.tokens for o in outs] == alone, sched.name
    assert not eng.running
    eng.tree.evict(eng.pool.num_pages)  # the tree's cache gone: nothing may be left held
    assert eng.pool.pages_in_use == 0
    s = m.summary()
    assert s["output_tokens"] == sum(r.max_new_tokens for r in reqs)
    assert s["prefill_tokens"] <= s["prompt_tokens"]
    print(sched.name, s["prefill_tokens"], s["peak_pages"], s["steps"])


def test_a_tight_page_budget_makes_requests_wait_not_vanish(model):
  seed = 42
  print(f"seed={seed}")
  reqs = _requests(seed, groups=2, per=4)
  alone = [generate(model, [list(r.prompt)], max_new_tokens=r.max_new_tokens, pad_to=16)[0]
           for r in reqs]
  need = max(-(-(len(r.prompt) + r.max_new_tokens) // 4) for r in reqs)
  for make in (FCFS, BatchLLM):
    eng = _engine(model, num_pages=need + 9, max_running=None)
    outs, m = eng.run(reqs, make(), progress=False)
    assert [o.tokens for o in outs] == alone
    assert m.peak_pages <= need + 9
    eng.tree.evict(eng.pool.num_pages)  # the tree's cache gone: nothing may be left held
    assert eng.pool.pages_in_use == 0


def test_bad_requests_get_an_error_and_the_others_complete(model):
  good = _requests(43, groups=1, per=2)
  items = [good[0], [], list(range(200)), Request([1, 2, 3], 200), [CFG.vocab_size + 5],
           good[1]]
  eng = _engine(model, num_pages=8)
  outs, _ = eng.run(items, BatchLLM(), progress=False)
  assert [o.finish for o in outs][1:5] == ["error"] * 4
  assert "empty" in outs[1].error and "max_seq_len" in outs[2].error
  assert "max_seq_len" in outs[3].error and "vocabulary" in outs[4].error
  for i in (0, 5):
    want = generate(model, [list(items[i].prompt)], max_new_tokens=items[i].max_new_tokens,
                    pad_to=16)[0]
    assert outs[i].tokens == want and outs[i].finish == "length"
  small = _engine(model, num_pages=2)
  (o,), _ = small.run([Request(list(range(20)), 4)], FCFS(), progress=False)
  assert "pages" in o.error


def test_stop_tokens_end_a_request(model):
  reqs = _requests(44, groups=1, per=3)
  free, _ = _engine(model).run(reqs, FCFS(), progress=False)
  stop = free[0].tokens[1]
  stopped = [Request(r.prompt, r.max_new_tokens, (stop,)) for r in reqs]
  outs, _ = _engine(model).run(stopped, BatchLLM(), progress=False)
  for f, o in zip(free, outs):
    cut = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
    assert o.tokens == f.tokens[:cut]
    assert o.finish == ("stop" if stop in f.tokens else "length")
