"""Tests for experiments/data.py: corpus, split, tokenizer, caches and batches."""

import dataclasses
import json
import pathlib
import sysconfig

import numpy as np
import pytest

from experiments import data
from experiments.data import DataConfig, Dataset, corpus_files, load_tokenizer, prepare, split_files

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def class return "
         "import for while if else self None True False").split()
EOT = "<|endoftext|>"


def _text(rng: np.random.Generator, n_lines: int) -> str:
  lines = []
  for _ in range(n_lines):
    indent = "  " * int(rng.integers(0, 3))
    lines.append(indent + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) + "\n")
  return "".join(lines)


def _write_corpus(root: pathlib.Path, n_files: int = 24, seed: int = 0) -> dict[str, str]:
  """A folder of small text files (one non-ASCII) in nested folders; returns {relpath: text}."""
  rng = np.random.default_rng(seed)
  texts = {}
  for i in range(n_files):
    rel = f"pkg{i % 3}/file_{i:02d}.txt"
    texts[rel] = _text(rng, 40) + ("naïve café — 日本語 ✓\n" if i == 5 else "")
  for rel, text in texts.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text, encoding="utf-8")
  return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, dict[str, str]]:
  root = tmp_path_factory.mktemp("corpus")
  return root, _write_corpus(root)


@pytest.fixture(scope="module")
def ds(corpus, tmp_path_factory) -> Dataset:
  root, _ = corpus
  cache = tmp_path_factory.mktemp("cache")
  return prepare(DataConfig(source=str(root), vocab_size=331, cache_dir=str(cache)), progress=False)


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 0.6}, "val_fraction"),
    ({"vocab_size": 299}, "vocab_size"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"source": ""}, "source"),
])
def test_config_rejects_bad_values(kwargs, field):
  with pytest.raises(ValueError, match=field):
    DataConfig(**kwargs)


# --- corpus files and split ---------------------------------------------------------------------


def test_corpus_files_sorted_skips_hidden(tmp_path):
  _write_corpus(tmp_path, n_files=6)
  (tmp_path / ".git").mkdir()
  (tmp_path / ".git" / "HEAD").write_text("ref: x\n")
  (tmp_path / ".hidden.txt").write_text("x\n")
  files = corpus_files(str(tmp_path))
  rels = [f.relative_to(tmp_path.resolve()).as_posix() for f in files]
  assert rels == sorted(rels) and len(rels) == 6
  assert not any(r.startswith(".") for r in rels)


def test_corpus_files_stdlib():
  files = corpus_files("stdlib")
  root = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
  rels = [f.relative_to(root) for f in files]
  assert len(files) > 100 and all(f.suffix == ".py" for f in files)
  assert not any({"site-packages", "test", "__pycache__"} & set(r.parts) for r in rels)
  assert pathlib.Path("os.py") in rels


def test_split_deterministic_disjoint_and_stable(corpus):
  root, texts = corpus
  files = corpus_files(str(root))
  train, val = split_files(files, 0.2)
  assert (train, val) == split_files(files, 0.2)
  assert train and val and not set(train) & set(val)
  assert sorted(train + val) == sorted(files)
  # Removing a file moves no other.
  train2, val2 = split_files(files[1:], 0.2, root=root)
  assert set(val2) == set(val) - {files[0]} and set(train2) == set(train) - {files[0]}


@pytest.mark.parametrize("n", [2, 3, 5])
def test_split_both_sides_nonempty(n):
  files = [pathlib.Path(f"/c/f{i}.txt") for i in range(n)]
  for frac in (0.01, 0.5):
    train, val = split_files(files, frac)
    assert train and val and len(train) + len(val) == n


def test_split_single_file():
  assert split_files([pathlib.Path("/c/a.txt")], 0.1) == ([pathlib.Path("/c/a.txt")], [])


# --- errors -------------------------------------------------------------------------------------


def test_empty_corpus_errors(tmp_path):
  cache = str(tmp_path / "cache")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="has no text"):
    prepare(DataConfig(source=str(empty), cache_dir=cache), progress=False)
  (empty / "blob.bin").write_bytes(b"\x00\x01\x02binary")
  (empty / "nothing.txt").write_text("")
  with pytest.raises(ValueError, match=str(empty)):
    prepare(DataConfig(source=str(empty), cache_dir=cache), progress=False)
  with pytest.raises(ValueError, match="does not exist"):
    prepare(DataConfig(source=str(tmp_path / "missing"), cache_dir=cache), progress=False)


def test_too_short_split_error(ds):
  with pytest.raises(ValueError, match="fewer than seq_len"):
    ds.batch("val", 0, 2, ds.val.size, 0)
  ds.batch("val", 0, 2, ds.val.size - 1, 0)  # exactly enough


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "test"}, "split"),
    ({"step": -1}, "step"),
    ({"seed": -3}, "seed"),
    ({"seq_len": 0}, "seq_len"),
    ({"batch_size": 0}, "batch_size"),
])
def test_batch_rejects_bad_args(ds, kwargs, match):
  args = {"split": "train", "step": 0, "batch_size": 2, "seq_len": 8, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    ds.batch(**args)


# --- tokenizer and streams ----------------------------------------------------------------------


def test_special_tokens_and_dtype(ds):
  assert (ds.eot_id, ds.pad_id) == (0, 1)
  assert ds.vocab_size == ds.tokenizer.get_vocab_size() <= 331
  assert ds.train.dtype == np.uint16 and ds.val.dtype == np.uint16
  assert ds.train.max() < ds.vocab_size and ds.pad_id not in set(np.unique(ds.train).tolist())


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x + 1\n",
    "  leading spaces, trailing\t\n\n",
    "naïve café — 日本語 ✓ 🙂 Ünïcödé",
    "",
])
def test_tokenizer_round_trip(ds, text):
  assert ds.decode(ds.encode(text)) == text
  assert ds.decode(np.asarray(ds.encode(text), np.uint16)) == text


def test_streams_are_documents_joined_by_eot(ds, corpus):
  _, texts = corpus
  meta = json.loads((ds.path / "corpus.json").read_text())
  for split, stream in (("train", ds.train), ("val", ds.val)):
    files = meta[f"{split}_files"]
    assert files and (stream == ds.eot_id).sum() == len(files)
    assert ds.decode(stream) == "".join(texts[f] + EOT for f in files)
  assert not set(meta["train_files"]) & set(meta["val_files"])
  assert sorted(meta["train_files"] + meta["val_files"]) == sorted(texts)


def test_load_tokenizer(ds):
  tok = load_tokenizer(ds.path)
  assert tok.encode("alpha beta").ids == ds.encode("alpha beta")


# --- cache --------------------------------------------------------------------------------------


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
  root = tmp_path / "c"
  texts = _write_corpus(root, n_files=8, seed=1)
  cfg = DataConfig(source=str(root), vocab_size=320, cache_dir=str(tmp_path / "cache"))
  calls = []
  train_tokenizer = data._train_tokenizer
  monkeypatch.setattr(data, "_train_tokenizer", lambda *a, **k: calls.append(1) or
                      train_tokenizer(*a, **k))
  ds1 = prepare(cfg, progress=False)
  files = ["tokenizer.json", "train.bin", "val.bin", "train.json", "val.json"]
  mtimes = {f: (ds1.path / f).stat().st_mtime_ns for f in files}
  ds2 = prepare(cfg, progress=False)
  assert len(calls) == 1 and ds2.path == ds1.path
  assert mtimes == {f: (ds2.path / f).stat().st_mtime_ns for f in files}
  np.testing.assert_array_equal(ds1.train, ds2.train)
  np.testing.assert_array_equal(ds1.val, ds2.val)
  meta = json.loads((ds1.path / "train.json").read_text())
  assert meta["num_tokens"] == ds1.train.size and meta["dtype"] == "uint16"
  assert meta["vocab_size"] == ds1.vocab_size and meta["fingerprint"] == ds1.fingerprint
  assert not list(ds1.path.glob("*.tmp*"))
  # Another vocab size or changed text trains again.
  prepare(dataclasses.replace(cfg, vocab_size=330), progress=False)
  assert len(calls) == 2
  (root / next(iter(texts))).write_text("changed text\n")
  ds3 = prepare(cfg, progress=False)
  assert len(calls) == 3 and ds3.fingerprint != ds1.fingerprint


# --- batches ------------------------------------------------------------------------------------


def test_batch_shape_dtype_reproducible(ds):
  b = ds.batch("train", 7, 5, 13, seed=3)
  assert b.shape == (5, 14) and b.dtype == np.int32
  assert b.min() >= 0 and b.max() < ds.vocab_size
  np.testing.assert_array_equal(b, ds.batch("train", 7, 5, 13, seed=3))
  assert not np.array_equal(b, ds.batch("train", 8, 5, 13, seed=3))
  assert not np.array_equal(b, ds.batch("train", 7, 5, 13, seed=4))
  # A step's windows do not depend on what was drawn before (a resumed run).
  fresh = Dataset(ds.tokenizer, ds.train, ds.val)
  np.testing.assert_array_equal(fresh.batch("train", 7, 5, 13, seed=3), b)
  assert not np.array_equal(b[:, :8], ds.batch("val", 7, 5, 13, seed=3)[:, :8])


@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_windows_are_contiguous_slices(ds, split):
  seq_len = 11
  stream = np.asarray(ds.tokens(split), np.int32)
  windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
  for step in range(3):
    b = ds.batch(split, step, 4, seq_len, seed=0)
    x, y = b[:, :-1], b[:, 1:]
    for row in b:
      assert (windows == row).all(axis=1).any()
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])


# --- single file, max_bytes, stdlib -------------------------------------------------------------


def test_single_file_source(tmp_path):
  rng = np.random.default_rng(2)
  text = _text(rng, 200) + "ünïcödé ✓ 日本語\n" * 30
  path = tmp_path / "one.txt"
  path.write_text(text, encoding="utf-8")
  ds = prepare(DataConfig(source=str(path), vocab_size=320, val_fraction=0.1,
                          cache_dir=str(tmp_path / "cache")), progress=False)
  train, val = ds.decode(ds.train), ds.decode(ds.val)
  assert train.endswith(EOT) and val.endswith(EOT)
  train, val = train[:-len(EOT)], val[:-len(EOT)]
  assert train + val == text and train and val
  n = len(text.encode("utf-8"))
  assert abs(len(val.encode("utf-8")) - 0.1 * n) <= 4


def test_max_bytes_caps_corpus(tmp_path, corpus):
  root, texts = corpus
  cap = 5000
  ds = prepare(DataConfig(source=str(root), vocab_size=320, max_bytes=cap,
                          cache_dir=str(tmp_path / "cache")), progress=False)
  metas = [json.loads((ds.path / f"{s}.json").read_text()) for s in ("train", "val")]
  total = sum(m["num_bytes"] for m in metas)
  assert cap - 4 <= total <= cap
  meta = json.loads((ds.path / "corpus.json").read_text())
  kept = sorted(meta["train_files"] + meta["val_files"])
  assert kept == sorted(texts)[:len(kept)]  # the first files in sorted order


def test_stdlib_corpus(tmp_path):
  ds = prepare(DataConfig(max_bytes=300_000, vocab_size=512, cache_dir=str(tmp_path)),
               progress=False)
  assert ds.vocab_size == 512 and ds.train.size > 3 * ds.val.size > 0
  assert ds.train.size < 300_000 / 2  # BPE compresses Python source
  b = ds.batch("train", 0, 4, 64, seed=0)
  assert b.shape == (4, 65)
  text = "import os\n\ndef main():\n    print(os.getcwd())\n"
  assert ds.decode(ds.encode(text)) == text


# --- python: the stdlib plus installed packages -------------------------------------------------


def _name_on_side(val: bool, frac: float) -> str:
  """The first of pkg-0, pkg-1, ... that the package hash rule puts in validation (or train)."""
  return next(n for n in (f"pkg-{i}" for i in range(1000))
              if (data._unit_hash(f"site-packages/{n}") < frac) == val)


def _write_package(site: pathlib.Path, name: str, version: str, files: dict[str, bytes],
                   extra_record: tuple[str, ...] = ()) -> None:
  """A fake installed distribution: its files under `site` and a dist-info listing them."""
  info = site / f"{name.replace('-', '_')}-{version}.dist-info"
  info.mkdir(parents=True)
  (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  for rel, content in files.items():
    (site / rel).parent.mkdir(parents=True, exist_ok=True)
    (site / rel).write_bytes(content)
  record = [*files, *extra_record, f"{info.name}/METADATA", f"{info.name}/RECORD"]
  (info / "RECORD").write_text("".join(f"{r},,\n" for r in record))


def _fake_python(root: pathlib.Path, seed: int, frac: float) -> tuple[pathlib.Path, pathlib.Path,
                                                                       str, str]:
  """A fake stdlib folder and a site-packages with two packages, the first held out by frac.

  Returns:
    (stdlib, site, held-out package name, train package name).
  """
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  stdlib, site = root / "stdlib", root / "site"
  for rel in ("os.py", "json/__init__.py", "json/decoder.py", "abc.py", "site-packages/x/y.py",
              "test/test_os.py", "README.txt"):
    (stdlib / rel).parent.mkdir(parents=True, exist_ok=True)
    (stdlib / rel).write_text(_text(rng, 20))
  held, kept = _name_on_side(True, frac), _name_on_side(False, frac)
  for name, version in ((held, "1.2.0"), (kept, "0.3")):
    mod = name.replace("-", "_")
    _write_package(site, name, version, {
        f"{mod}/__init__.py": _text(rng, 10).encode(),
        f"{mod}/core.py": _text(rng, 30).encode(),
        f"{mod}/data.txt": b"not python\n",  # not .py
        f"{mod}/tests/test_core.py": b"assert True\n",  # a test suite
        f"{mod}/__pycache__/core.cpython-311.py": b"x = 1\n",  # bytecode folder
        f"{mod}/_vendor/six.py": b"vendored = True\n",  # a vendored copy
        f"{mod}/latin1.py": "s = 'caf\xe9'\n".encode("latin-1"),  # not UTF-8: skipped
        f"{mod}/empty.py": b"",
    }, extra_record=("../../../bin/tool.py",))  # outside the folder
  return stdlib, site, held, kept


@pytest.fixture
def fake_python(tmp_path):
  frac = 0.1
  return (*_fake_python(tmp_path, seed=11, frac=frac), frac)


def test_installed_packages_reads_record(fake_python):
  _, site, held, kept = fake_python[:4]
  pkgs = data.installed_packages([site])
  assert [(n, v) for n, v, _ in pkgs] == sorted([(held, "1.2.0"), (kept, "0.3")])
  for name, _, files in pkgs:
    mod = name.replace("-", "_")
    assert [r for r, _ in files] == [f"{mod}/__init__.py", f"{mod}/core.py", f"{mod}/empty.py",
                                     f"{mod}/latin1.py"]
    assert all(p == site / r and p.is_file() for r, p in files)


def test_installed_packages_first_folder_wins(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _write_package(a, "Foo_Bar", "2.0", {"foo_bar/m.py": b"x = 2\n"})
  _write_package(b, "foo-bar", "1.0", {"foo_bar/m.py": b"x = 1\n"})
  ((name, version, files),) = data.installed_packages([a, b])
  assert (name, version, files[0][1]) == ("foo-bar", "2.0", a / "foo_bar/m.py")


def test_python_holds_out_whole_packages(fake_python):
  stdlib, site, held, kept, frac = fake_python
  docs = data.read_python(stdlib_root=stdlib, dirs=[site])
  assert docs == data.read_python(stdlib_root=stdlib, dirs=[site])  # deterministic
  keys = [d.key for d in docs]
  std = [k for k in keys if not k.startswith("site-packages/")]
  assert std == ["abc.py", "json/__init__.py", "json/decoder.py", "os.py"]  # stdlib first, sorted
  assert keys[len(std):] == sorted(keys[len(std):])
  assert {d.package for d in docs} == {None, held, kept}
  assert not any("latin1" in k or "tests/" in k or "_vendor" in k or "empty" in k for k in keys)
  splits = data._split_docs(docs, frac, "python")
  assert {d.package for d in splits["val"]} - {None} == {held}
  assert {d.package for d in splits["train"]} - {None} == {kept}
  # The stdlib's files split by the stdlib's rule: a hash of their path.
  assert [d.key for d in splits["val"] if d.package is None] == [
      k for k in std if data._unit_hash(k) < frac]


def test_python_cap_takes_whole_packages_in_order(fake_python):
  stdlib, site, *_ = fake_python
  docs = data.read_python(stdlib_root=stdlib, dirs=[site])
  size = {}
  for d in docs:
    size[d.package] = size.get(d.package, 0) + len(d.text.encode("utf-8"))
  first, second = sorted(p for p in size if p is not None)
  for cap, packages in ((size[None] + size[first], {None, first}),
                        (size[None] + size[first] + size[second] - 1, {None, first}),
                        (size[None] + 1, {None}),
                        (sum(size.values()), set(size))):
    capped = data.read_python(cap, stdlib_root=stdlib, dirs=[site])
    assert {d.package for d in capped} == packages
    assert capped == docs[:len(capped)]
  small = data.read_python(100, stdlib_root=stdlib, dirs=[site])  # cut inside the stdlib
  assert len(small) == 1 and len(small[0].text.encode()) == 100 and small[0].package is None


def test_prepare_python_records_packages(fake_python, tmp_path, monkeypatch):
  stdlib, site, held, kept, frac = fake_python
  read = data.read_python
  monkeypatch.setattr(data, "read_python",
                      lambda max_bytes=None: read(max_bytes, stdlib_root=stdlib, dirs=[site]))
  cfg = DataConfig(source="python", vocab_size=300, val_fraction=frac,
                   cache_dir=str(tmp_path / "cache"))
  ds = prepare(cfg, progress=False)
  meta = json.loads((ds.path / "corpus.json").read_text())
  pkgs = {p["name"]: p for p in meta["packages"]}
  assert (pkgs[held]["version"], pkgs[held]["split"]) == ("1.2.0", "val")
  assert (pkgs[kept]["version"], pkgs[kept]["split"]) == ("0.3", "train")
  assert pkgs[held]["files"] == 2 and pkgs[held]["bytes"] > 0
  assert any(f.startswith(f"site-packages/{held}/") for f in meta["val_files"])
  assert not any(f.startswith(f"site-packages/{kept}/") for f in meta["val_files"])
  assert not any(f.startswith(f"site-packages/{held}/") for f in meta["train_files"])
  for s in data.SPLITS:
    assert meta[f"{s}_bytes"] == json.loads((ds.path / f"{s}.json").read_text())["num_bytes"]
  assert meta["fingerprint"] == ds.fingerprint and meta["python"]
  assert ds.corpus["packages"] == meta["packages"] and ds.corpus["val_bytes"] == meta["val_bytes"]
  # Another version of a package (same files) is another corpus.
  info = next(site.glob(f"{kept.replace('-', '_')}-*.dist-info"))
  (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {kept}\nVersion: 0.4\n")
  ds2 = prepare(cfg, progress=False)
  assert ds2.fingerprint != ds.fingerprint
  assert {p["name"]: p["version"] for p in ds2.corpus["packages"]}[kept] == "0.4"


def test_python_source_selectable_from_config():
  from experiments.config import load_config
  assert load_config(None, ["data.source=python"]).data.source == "python"
  assert DataConfig(source="python").source == "python"


def test_installed_packages_of_this_interpreter():
  import importlib.metadata
  pkgs = {name: (version, files) for name, version, files in data.installed_packages()}
  version, files = pkgs["numpy"]
  assert version == importlib.metadata.version("numpy") and files
  assert all(r.endswith(".py") and "/tests/" not in r for r, _ in files)
  assert "effllm" not in pkgs or not pkgs["effllm"][1]  # an editable install adds no source
