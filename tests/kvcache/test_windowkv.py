"""WindowKV against a slow loop reference: windows of omega tokens scored 'max' / 'average',
the observation window kept, budgets per group pyramid, indices shared inside a group."""

import numpy as np
import pytest

from kvcache.windowkv import WindowKV


def _loop_windowkv(press, probs, pos, length, budget):
  t = probs.sum(axis=(0, 1))
  n, w = len(pos), press.omega
  obs = [j for j in range(n) if pos[j] >= 0 and pos[j] >= length - press.window]
  added = [pos[j] >= 0 and j not in obs for j in range(n)]
  wins = []
  for i in range(-(-n // w)):
    slots = list(range(i * w, min(n, i * w + w)))
    vals = sorted([t[j] if added[j] else 0.0 for j in slots] + [0.0] * (w - len(slots)))
    if not any(added[j] for j in slots):
      continue
    s = np.mean(vals[w - max(1, w // 2):]) if press.score == "max" else np.mean(vals)
    wins.append((-s, i, [j for j in slots if added[j]]))
  keep, room = set(pos[obs].tolist()), budget - len(obs)
  for _, _, slots in sorted(wins, key=lambda x: (x[0], x[1])):
    for j in slots:
      if room > 0:
        keep.add(int(pos[j]))
        room -= 1
  return keep


@pytest.mark.parametrize("score", ["max", "average"])
def test_windowkv_keeps_what_the_loop_reference_keeps(score, press_inputs, kept_positions):
  seed = 71
  print(f"seed={seed}")
  cache, scores, lengths = press_inputs(seed, n_layers=5)
  press = WindowKV(20, window=6, score=score, omega=4, gamma=2, lam=3.0, room=2)
  out = press(cache, scores)
  budgets = press.layer_budgets(5, 2, cache.max_len)
  assert budgets[0] == budgets[1] and budgets[2] == budgets[3] and budgets[0] > budgets[4]
  assert out.budgets() == tuple(tuple(b + 2 for b in bl) for bl in budgets)
  for li in range(5):
    src = li - li % 2  # the group's first layer selects
    for b in range(2):
      for h in range(2):
        pos = np.asarray(cache.layers[src].groups[0].pos[b, h])
        want = _loop_windowkv(press, np.asarray(scores[src][0][b, h]), pos, int(lengths[b]),
                              budgets[li][h])
        assert kept_positions(out, li, b, h) == want, (li, b, h)


def test_task_switch_and_bad_names():
  loc, agg = WindowKV.for_task("localization", 64), WindowKV.for_task("aggregation", 64)
  assert (loc.score, loc.window, agg.score, agg.window) == ("max", 32, "average", 16)
  with pytest.raises(ValueError, match="unknown task type 'summarise'"):
    WindowKV.for_task("summarise", 64)
  with pytest.raises(ValueError, match="'median'"):
    WindowKV(64, score="median")
