"""S2Pattern: the layout against the paper's formula by brute force, coverage, GQA, homo-head,
dense heads, and errors that name the bad field."""

import numpy as np
import pytest

from s2attn import S2Pattern, dense_layer_ids, hybrid_layer_attn, s2_options_from_spec, s2_spec


def brute_layout(p: S2Pattern, heads: int, seq_len: int, kv_heads=None) -> np.ndarray:
  """The formula, one (h, q, k) at a time."""
  n = -(-seq_len // p.block_size)
  pheads = heads if kv_heads is None else kv_heads
  group = heads // pheads
  step = p.head_sliding_step or max(1, p.vert_stride // pheads)
  out = np.zeros((heads, n, n), bool)
  for h in range(heads):
    ph = 0 if p.homo_head else h // group
    dense = h >= heads - p.num_dense_heads
    for q in range(n):
      for k in range(n):
        local = 0 <= q - k < p.local_blocks
        vert = (k + ph * step + p.head_sliding_offset) % p.vert_stride == 0
        out[h, q, k] = (local or vert or dense) and k <= q
  return out


def random_patterns(count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  for _ in range(count):
    kv = int(rng.choice([1, 2, 3]))
    heads = kv * int(rng.choice([1, 2, 4]))
    per_kv = bool(rng.integers(2))
    group = heads // kv if per_kv else 1
    p = S2Pattern(
        block_size=int(rng.choice([16, 32, 64])), local_blocks=int(rng.integers(1, 5)),
        vert_stride=int(rng.integers(1, 17)), homo_head=bool(rng.random() < 0.2),
        head_sliding_step=None if rng.random() < 0.6 else int(rng.integers(1, 5)),
        head_sliding_offset=int(rng.integers(0, 4)),
        num_dense_heads=group * int(rng.integers(0, heads // group + 1)) if rng.random() < 0.3
        else 0)
    seq_len = int(rng.integers(1, 20 * p.block_size))
    yield p, heads, seq_len, (kv if per_kv else None)


@pytest.mark.parametrize("case", list(random_patterns(40)))
def test_layout_matches_formula(case):
  p, heads, seq_len, kv = case
  got = p.layout(heads, seq_len, kv)
  n = -(-seq_len // p.block_size)
  assert got.shape == (heads, n, n) and got.dtype == bool
  np.testing.assert_array_equal(got, brute_layout(p, heads, seq_len, kv))
  # Coverage at this length is what the union says; residue coverage implies it at any length.
  union = got.any(0)
  assert p.covers(heads, kv, seq_len=seq_len) == bool((union == np.tri(n, dtype=bool)).all())
  if p.covers(heads, kv):
    assert p.covers(heads, kv, seq_len=seq_len)


def test_default_step_spreads_heads_over_every_residue():
  p = S2Pattern(block_size=16, local_blocks=1, vert_stride=8)
  assert p.head_offsets(8).tolist() == list(range(8))
  assert p.head_offsets(4).tolist() == [0, 2, 4, 6]  # step = 8 // 4
  assert p.head_offsets(16).tolist() == [h % 8 for h in range(16)]  # step max(1, 0) = 1
  assert p.covers(8) and p.covers(16) and not p.covers(4)
  lay = p.layout(8, 8 * 16 * 4)
  # The local window (1 block) alone leaves gaps; the union of the 8 heads fills them.
  tri = np.tri(lay.shape[1], dtype=bool)
  assert not any(np.array_equal(lay[h], tri) for h in range(8))
  np.testing.assert_array_equal(lay.any(0), tri)


def test_gqa_patterns_per_kv_head_repeat_over_the_group():
  p = S2Pattern(block_size=16, local_blocks=2, vert_stride=4)
  lay = p.layout(6, 300, num_kv_heads=2)
  np.testing.assert_array_equal(lay[0], lay[1])
  np.testing.assert_array_equal(lay[1], lay[2])
  np.testing.assert_array_equal(lay[3], lay[5])
  assert not np.array_equal(lay[0], lay[3])
  assert p.head_offsets(6, 2).tolist() == [0, 0, 0, 2, 2, 2]  # step = 4 // 2 over KV heads
  assert not p.covers(6, 2) and p.covers(6)  # two KV shards cannot cover stride 4; six heads do


def test_homo_head_is_one_pattern_and_never_covers():
  p = S2Pattern(block_size=32, local_blocks=3, vert_stride=4, homo_head=True,
                head_sliding_offset=1)
  lay = p.layout(5, 1000)
  assert all(np.array_equal(lay[0], lay[h]) for h in range(5))
  assert p.head_offsets(5).tolist() == [1] * 5
  assert not p.covers(5)
  assert S2Pattern(32, 3, 1, homo_head=True).covers(5)  # stride 1 is dense


def test_dense_heads_cover_and_are_causal():
  p = S2Pattern(block_size=16, local_blocks=1, vert_stride=16, homo_head=True, num_dense_heads=2)
  lay = p.layout(4, 160)
  tri = np.tri(10, dtype=bool)
  np.testing.assert_array_equal(lay[2], tri)
  np.testing.assert_array_equal(lay[3], tri)
  assert not np.array_equal(lay[1], tri)
  assert p.covers(4) and p.covers(4, seq_len=160)
  assert p.dense_heads(4).tolist() == [False, False, True, True]


def test_require_coverage_rejects_a_config_that_cannot_cover():
  ok = S2Pattern(16, 2, 8, require_coverage=True)
  ok.layout(8, 256)
  with pytest.raises(ValueError, match="require_coverage.*residues"):
    ok.layout(4, 256)
  with pytest.raises(ValueError, match="require_coverage"):
    S2Pattern(16, 2, 8, homo_head=True, require_coverage=True).layout(8, 256)
  with pytest.raises(ValueError, match="require_coverage"):
    ok.layout(8, 256, num_kv_heads=2)  # two KV shards of stride 8
  with pytest.raises(ValueError, match="require_coverage"):
    ok.check_coverage(4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=8), "block_size"), (dict(block_size=48), "block_size"),
    (dict(block_size=64.0), "block_size"), (dict(local_blocks=0), "local_blocks"),
    (dict(vert_stride=0), "vert_stride"), (dict(vert_stride=-3), "vert_stride"),
    (dict(head_sliding_step=0), "head_sliding_step"),
    (dict(head_sliding_offset=-1), "head_sliding_offset"),
    (dict(num_dense_heads=-1), "num_dense_heads"),
])
def test_bad_parameters_name_the_field(kwargs, field):
  base = dict(block_size=64, local_blocks=4, vert_stride=8)
  with pytest.raises(ValueError, match=field):
    S2Pattern(**{**base, **kwargs})


def test_bad_head_counts():
  p = S2Pattern(16, 2, 4, num_dense_heads=3)
  with pytest.raises(ValueError, match="num_dense_heads"):
    p.layout(2, 64)
  with pytest.raises(ValueError, match="multiple of the query group"):
    p.layout(4, 64, num_kv_heads=2)
  with pytest.raises(ValueError, match="num_kv_heads"):
    p.layout(4, 64, num_kv_heads=3)


def test_spec_round_trip_and_hybrid_stacks():
  p = S2Pattern(32, 4, 16, head_sliding_offset=1, num_dense_heads=2)
  spec = s2_spec(p, per_kv_head=True, impl="reference")
  assert spec == ("s2:block_size=32,local_blocks=4,vert_stride=16,head_sliding_offset=1,"
                  "num_dense_heads=2,per_kv_head=true,impl=reference")
  o = s2_options_from_spec(spec)
  assert o.pattern == p and o.per_kv_head and o.impl == "reference"
  assert s2_options_from_spec("auto") is None
  with pytest.raises(ValueError, match="unknown option.*stride"):
    s2_options_from_spec("s2:stride=8")
  assert dense_layer_ids(8, dense_every=4) == (3, 7)
  assert dense_layer_ids(6, dense_every=4, dense_layers=[0]) == (0, 3)
  assert hybrid_layer_attn(4, "s2:vert_stride=8", dense="reference", dense_every=2) == (
      "s2:vert_stride=8", "reference", "s2:vert_stride=8", "reference")
  with pytest.raises(ValueError, match="dense_layers"):
    dense_layer_ids(4, dense_layers=[4])
