"""Text corpus, byte-level BPE tokenizer and cached token memmaps; seeded random-window batches.

The default corpus is the Python standard library source of the running machine (no download, ever);
`python` adds the `.py` files of the interpreter's installed packages (about 100 MB, different on
every machine with other packages); any text file or folder works instead. Files are split into
train and validation by a hash of their relative path (installed packages: whole packages, by a hash
of their name), a byte-level BPE is trained on the train split only, and each split is encoded once
into a memmap of token ids (documents each followed by `<|endoftext|>`). Everything is cached under
`cache_dir/<corpus fingerprint>-v<vocab_size>/` and re-used while the corpus is unchanged; its
corpus.json records the split's files and bytes and the packages with their versions.

  ds = prepare(DataConfig(max_bytes=2_000_000, vocab_size=2048))
  xy = ds.batch("train", step=0, batch_size=8, seq_len=256, seed=0)  # int32 [8, 257]
  inputs, targets = xy[:, :-1], xy[:, 1:]
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import re
import site
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)  # ids 0 and 1, in this order
SPLITS = ("train", "val")
FORMAT_VERSION = 1  # bump when the cache layout or the corpus reading changes
# Directories left out of the stdlib corpus: installed packages, bytecode and test suites (the test
# suites double the size and are full of generated data).
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                               "idle_test"})
# Directories left out of installed packages: bytecode, test suites, and vendored copies of other
# packages (pip's and setuptools' _vendor), which would leak held-out packages into train.
_PACKAGE_SKIP_DIRS = frozenset({"__pycache__", "test", "tests", "_vendor"})
SOURCES = ("stdlib", "python")  # the embedded sources; any other source is a path
PYTHON_MAX_BYTES = 100_000_000  # the 'python' source's cap when max_bytes is None
_SITE_KEY = "site-packages"  # an installed package's files are keyed site-packages/<name>/<path>
_ENCODE_PIECE_BYTES = 1 << 20  # long documents are encoded in ~1 MB pieces, in parallel
_ENCODE_CHUNK = 64  # pieces per encode_batch call


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it is tokenized and cached."""

  source: str = "stdlib"  # 'stdlib', 'python' (stdlib + installed packages) or a file or folder
  vocab_size: int = 4096  # BPE vocabulary size, special tokens included (an upper bound)
  val_fraction: float = 0.05  # share of files (installed packages; a single file's bytes) held out
  max_bytes: int | None = None  # cap on corpus bytes, files taken in sorted order (quick starts);
  # 'python' caps at PYTHON_MAX_BYTES when None
  cache_dir: str = "runs/.data_cache"  # where tokenizers and memmaps are cached
  tokenizer: str | None = None  # encode with this tokenizer.json (an imported model's) instead

  def __post_init__(self):
    if not isinstance(self.source, str) or not self.source:
      raise ValueError(f"DataConfig.source must be one of {SOURCES} or a path, got "
                       f"{self.source!r}")
    if not 0.0 < self.val_fraction <= 0.5:
      raise ValueError(f"DataConfig.val_fraction must be in (0, 0.5], got {self.val_fraction}")
    if self.vocab_size < 300:
      raise ValueError(f"DataConfig.vocab_size must be >= 300 (256 bytes + specials + merges), "
                       f"got {self.vocab_size}")
    if self.max_bytes is not None and self.max_bytes <= 0:
      raise ValueError(f"DataConfig.max_bytes must be positive or None, got {self.max_bytes}")


@dataclasses.dataclass(frozen=True)
class _Doc:
  """One document of the corpus: its key (relative posix path) and text, and the installed
  package it belongs to (the 'python' source; None for the stdlib's and a folder's files)."""

  key: str
  text: str
  package: str | None = None  # normalized distribution name; the package is split as a whole
  version: str | None = None  # its version


# --------------------------------------------------------------------------------------------------
# Corpus files and the split.


def _source_root(source: str) -> tuple[pathlib.Path, bool]:
  """The root folder (or file) of `source` and whether it is the stdlib."""
  if source == "stdlib":
    return pathlib.Path(sysconfig.get_paths()["stdlib"]), True
  path = pathlib.Path(source).expanduser()
  if not path.exists():
    raise ValueError(f"data source {source!r} does not exist (expected 'stdlib', 'python' or a "
                     "path to a text file or folder)")
  return path, False


def corpus_files(source: str) -> list[pathlib.Path]:
  """The files of a corpus source, sorted by relative path.

  Args:
    source: 'stdlib' (every `*.py` under `sysconfig.get_paths()["stdlib"]`, without site-packages,
      `__pycache__` and the test suites), 'python' (the stdlib's, then those of `installed_packages`
      package by package, all of them: the cap applies when read), a path to a text file, or a
      folder (every file below it, hidden files and folders left out; binary files are skipped
      later, when read).

  Returns:
    Absolute paths, sorted by their path relative to the source root ('python': in corpus order).
  """
  if source == "python":
    return corpus_files("stdlib") + [path for _, _, files in installed_packages()
                                     for _, path in files]
  root, is_stdlib = _source_root(source)
  return _walk(root.resolve(), is_stdlib)  # files are not resolved: a symlink keeps its own name


def _walk(root: pathlib.Path, is_stdlib: bool) -> list[pathlib.Path]:
  """The files below `root` (or root itself, a file), sorted by relative path; see corpus_files."""
  if root.is_file():
    return [root]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked folders
    dirnames[:] = [d for d in dirnames if not d.startswith(".")
                   and not (is_stdlib and d in _STDLIB_SKIP_DIRS)]
    for name in filenames:
      if name.startswith(".") or (is_stdlib and not name.endswith(".py")):
        continue
      path = pathlib.Path(dirpath, name)
      if path.is_file():
        found.append(path)
  return sorted(found, key=lambda p: _rel_key(p, root))


def _rel_key(path: pathlib.Path, root: pathlib.Path) -> str:
  """The path of `path` relative to `root` in posix form (the file's name when it is the root)."""
  path = pathlib.Path(path)
  try:
    rel = path.relative_to(root)
  except ValueError:
    return path.as_posix()
  return rel.as_posix() if rel.parts else path.name


def _unit_hash(key: str) -> float:
  """A uniform number in [0, 1) from a string, stable across runs and machines."""
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") / 2.0**64


def _is_val(keys: Sequence[str], val_fraction: float) -> list[bool]:
  """Which keys go to validation: hash below val_fraction, both sides kept non-empty if len >= 2."""
  u = [_unit_hash(k) for k in keys]
  is_val = [x < val_fraction for x in u]
  if len(keys) >= 2:
    if not any(is_val):  # the file with the smallest hash moves to validation
      is_val[min(range(len(u)), key=u.__getitem__)] = True
    if all(is_val):  # the file with the largest hash moves back to train
      is_val[max(range(len(u)), key=u.__getitem__)] = False
  return is_val


def split_files(files: Sequence[pathlib.Path | str], val_fraction: float,
                *, root: pathlib.Path | str | None = None) -> tuple[list, list]:
  """Splits files into train and validation by a hash of their relative path.

  A file's side depends only on its own relative path, so adding or removing a file moves no
  other (except for the fix-up that keeps both sides non-empty when there are at least two files).
  A single file goes to train; `prepare` then splits its bytes instead.

  Args:
    files: paths, e.g. from `corpus_files`.
    val_fraction: expected share of files in validation, in (0, 0.5].
    root: folder the paths are taken relative to; defaults to their common parent folder.

  Returns:
    (train, val): lists of the given paths, each in the input order.
  """
  files = list(files)
  if not files:
    return [], []
  if root is None:
    root = os.path.commonpath([str(pathlib.Path(f).parent) for f in files])
  keys = [_rel_key(pathlib.Path(f), pathlib.Path(root)) for f in files]
  is_val = _is_val(keys, val_fraction)
  return ([f for f, v in zip(files, is_val) if not v], [f for f, v in zip(files, is_val) if v])


def _utf8_boundary(data: bytes, cut: int, *, forward: bool) -> int:
  """Moves a byte offset off UTF-8 continuation bytes, so the cut falls between characters."""
  step = 1 if forward else -1
  while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
    cut += step
  return cut


def _normalize(name: str) -> str:
  """A distribution's normalized name (PEP 503): lower case, runs of -_. as one '-'."""
  return re.sub(r"[-_.]+", "-", name).lower()


def site_dirs() -> list[pathlib.Path]:
  """The running interpreter's site-packages folders (a venv's own first), existing, each once."""
  paths = sysconfig.get_paths()
  dirs = [paths["purelib"], paths["platlib"], *getattr(site, "getsitepackages", list)()]
  if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
  out = []
  for d in map(pathlib.Path, dirs):
    if d.is_dir() and d.resolve() not in {o.resolve() for o in out}:
      out.append(d)
  return out


def _is_package_source(rel: pathlib.PurePath) -> bool:
  """Whether a file a distribution's RECORD lists is package source the corpus reads."""
  *folders, name = rel.parts
  return (rel.suffix == ".py" and not rel.is_absolute() and ".." not in folders
          and not name.startswith((".", "__editable__"))  # editable installs' generated finders
          and not any(f.startswith(".") or f in _PACKAGE_SKIP_DIRS for f in folders))


def installed_packages(dirs: Sequence[pathlib.Path | str] | None = None
                       ) -> list[tuple[str, str, list[tuple[str, pathlib.Path]]]]:
  """The installed distributions and their `.py` source files, sorted by name.

  Distributions are found by `importlib.metadata` in `dirs` (only there: not the current folder,
  whose egg-info would add this project's own source) and their files read off their RECORD (one
  without RECORD has none); bytecode, test suites, vendored copies (`_vendor`), hidden files and
  files outside the folder are left out. A name found twice keeps its first folder's copy, the one
  `import` would see.

  Args:
    dirs: site-packages folders; None: `site_dirs()`.

  Returns:
    [(normalized name, version, [(path in the distribution's folder (posix), absolute path)])],
    sorted by name, each distribution's files sorted by their path.
  """
  dirs = site_dirs() if dirs is None else [pathlib.Path(d) for d in dirs]
  found = {}
  for d in dirs:
    dists = []
    for dist in importlib.metadata.distributions(path=[str(d)]):
      name = dist.metadata.get("Name")
      if name:
        dists.append((_normalize(name), dist.version or "", dist))
    for name, version, dist in sorted(dists, key=lambda x: x[:2]):
      if name in found:  # shadowed by an earlier folder's (or the same folder's broken) copy
        continue
      rels = sorted({f.as_posix() for f in dist.files or () if _is_package_source(f)})
      found[name] = (version, [(r, pathlib.Path(dist.locate_file(r))) for r in rels])
  return [(name, *found[name]) for name in sorted(found)]


def read_python(max_bytes: int | None = None, *, stdlib_root: pathlib.Path | str | None = None,
                dirs: Sequence[pathlib.Path | str] | None = None) -> list[_Doc]:
  """Reads the 'python' corpus: the stdlib's `.py` files, then those of the installed packages.

  The stdlib's files are read as for the 'stdlib' source, under the same keys (so they split the
  same way); a package's files are keyed `site-packages/<name>/<path>` and carry the package's
  name and version, and a file that is not valid UTF-8 is skipped. The cap (max_bytes, or
  PYTHON_MAX_BYTES when None) takes the stdlib's files in sorted order (the last one cut at the
  cap), then whole packages in sorted order of name, stopping before the first that would pass
  it: the corpus is the stdlib plus the first packages of the sorted list that fit.

  Args:
    max_bytes: the cap in bytes; None: PYTHON_MAX_BYTES.
    stdlib_root: the standard library folder; None: the running interpreter's.
    dirs: site-packages folders; None: the running interpreter's (`site_dirs()`).

  Returns:
    The documents, in corpus order.
  """
  cap = PYTHON_MAX_BYTES if max_bytes is None else max_bytes
  root = pathlib.Path(stdlib_root or sysconfig.get_paths()["stdlib"]).resolve()
  docs = _read_files(_walk(root, True), root, cap)
  total, seen, skipped = sum(len(d.text.encode("utf-8")) for d in docs), set(), 0
  packages = installed_packages(dirs)
  for i, (name, version, files) in enumerate(packages):
    pkg, size = [], 0
    for rel, path in files:
      try:
        data = path.read_bytes()
        text = data.decode("utf-8")
      except (OSError, UnicodeDecodeError):  # unreadable or not UTF-8
        skipped += 1
        continue
      if not data or b"\0" in data or path.resolve() in seen:  # empty, binary or another's
        continue
      seen.add(path.resolve())
      pkg.append(_Doc(f"{_SITE_KEY}/{name}/{rel}", text, name, version))
      size += len(data)
    if total + size > cap:
      log.info("python corpus: %d of %d packages left out by the %d-byte cap, from %s on",
               len(packages) - i, len(packages), cap, name)
      break
    docs += pkg
    total += size
  log.info("python corpus: %.1f MB in %d files (%d packages; %d files skipped: unreadable or "
           "not UTF-8)", total / 1e6, len(docs), len({d.package for d in docs} - {None}), skipped)
  return docs


def _read_docs(source: str, max_bytes: int | None) -> list[_Doc]:
  """Reads the corpus as UTF-8 text (errors replaced), skipping binary and empty files.

  With max_bytes, files are taken in sorted order until the cap; the last one is cut at the cap.
  The 'python' source is read by `read_python`.
  """
  if source == "python":
    docs, where = read_python(max_bytes), " in the stdlib or site-packages"
  else:
    root = _source_root(source)[0].resolve()
    docs = _read_files(corpus_files(source), root, max_bytes)
    where = f" in {root}" if root.is_dir() else ""
  if not docs:
    raise ValueError(f"data source {source!r} has no text: no readable non-empty, non-binary "
                     f"files{where}")
  return docs


def _read_files(paths: Iterable[pathlib.Path], root: pathlib.Path,
                max_bytes: int | None) -> list[_Doc]:
  """The non-empty, non-binary files among paths as documents keyed relative to root, in order,
  until max_bytes (the last one cut at the cap)."""
  docs, total = [], 0
  for path in paths:
    if max_bytes is not None and total >= max_bytes:
      break
    try:
      data = path.read_bytes()
    except OSError as e:  # unreadable files (permissions, broken links) are skipped
      log.warning("skipping %s: %s", path, e)
      continue
    if not data or b"\0" in data:  # empty or binary
      continue
    if max_bytes is not None and total + len(data) > max_bytes:
      data = data[:_utf8_boundary(data, max_bytes - total, forward=False)]
      if not data:
        break
    total += len(data)
    docs.append(_Doc(_rel_key(path, root), data.decode("utf-8", errors="replace")))
  return docs


def _split_unit(doc: _Doc) -> str:
  """What the split hashes: a file's key, or for an installed package's file the package's."""
  return doc.key if doc.package is None else f"{_SITE_KEY}/{doc.package}"


def _split_docs(docs: list[_Doc], val_fraction: float, source: str) -> dict[str, list[_Doc]]:
  """Train/val split: by file when there are several (an installed package's files go together),
  else a byte cut at (1 - val_fraction)."""
  if len(docs) >= 2:
    units = list(dict.fromkeys(_split_unit(d) for d in docs))
    is_val = dict(zip(units, _is_val(units, val_fraction)))
    return {"train": [d for d in docs if not is_val[_split_unit(d)]],
            "val": [d for d in docs if is_val[_split_unit(d)]]}
  (doc,) = docs
  data = doc.text.encode("utf-8")
  cut = min(max(int(len(data) * (1.0 - val_fraction)), 1), len(data) - 1)
  cut = _utf8_boundary(data, cut, forward=True)
  if cut >= len(data):
    cut = _utf8_boundary(data, cut - 1, forward=False)
  if not 0 < cut < len(data):
    raise ValueError(f"data source {source!r} is too small to split into train and validation "
                     f"({len(data)} bytes)")
  return {"train": [_Doc(doc.key, data[:cut].decode("utf-8"))],
          "val": [_Doc(doc.key, data[cut:].decode("utf-8"))]}


def _fingerprint(splits: dict[str, list[_Doc]]) -> str:
  """A content hash of the split corpus (keys, sides, package versions, texts) and the format."""
  h = hashlib.sha256(f"effllm-data-v{FORMAT_VERSION}\0".encode())
  for split in SPLITS:
    for doc in splits[split]:
      text = doc.text.encode("utf-8")
      h.update(f"{split}\0{doc.key}\0{len(text)}\0".encode())
      if doc.package is not None:
        h.update(f"{doc.package}=={doc.version}\0".encode())
      h.update(text)
  return h.hexdigest()


def corpus_summary(source: str, splits: dict[str, list[_Doc]]) -> dict:
  """What a run records about its corpus besides the fingerprint.

  Returns:
    {"source", "python" (the interpreter's version, for the embedded sources), "<split>_bytes",
    "<split>_docs" for train and val, "packages": [{"name", "version", "split", "files",
    "bytes"}] sorted by name (the installed packages in the corpus; empty but for 'python')}.
  """
  out: dict = {"source": source}
  if source in SOURCES:
    out["python"] = platform.python_version()
  packages = {}
  for split in SPLITS:
    out[f"{split}_bytes"] = out[f"{split}_docs"] = 0
    for doc in splits[split]:
      n = len(doc.text.encode("utf-8"))
      out[f"{split}_bytes"] += n
      out[f"{split}_docs"] += 1
      if doc.package is not None:
        p = packages.setdefault(doc.package, {"name": doc.package, "version": doc.version,
                                              "split": split, "files": 0, "bytes": 0})
        p["files"] += 1
        p["bytes"] += n
  out["packages"] = [packages[k] for k in sorted(packages)]
  return out


# --------------------------------------------------------------------------------------------------
# Tokenizer.


def _train_tokenizer(texts: Iterable[str], vocab_size: int, *, length: int | None = None,
                     progress: bool = False) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE with `<|endoftext|>` (id 0) and `<|pad|>` (id 1)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=progress)
  tok.train_from_iterator(texts, trainer=trainer, length=length)
  return tok


def load_tokenizer(path: pathlib.Path | str, strict: bool = True) -> tokenizers.Tokenizer:
  """Loads a tokenizer saved by `prepare` (a `tokenizer.json` file or the folder holding one);
  strict=False accepts any tokenizer.json (an imported model's) without our special tokens."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  tok = tokenizers.Tokenizer.from_file(str(path))
  for i, name in enumerate(SPECIAL_TOKENS if strict else ()):
    if tok.token_to_id(name) != i:
      raise ValueError(f"tokenizer {path} must have {name} at id {i}, has {tok.token_to_id(name)}")
  return tok


END_TOKENS = (EOT, "<|end_of_text|>", "</s>", "<eos>")  # ours, then LLaMA 3, LLaMA 2 / Mistral


def eot_token_id(tok: tokenizers.Tokenizer) -> int | None:
  """The id of the first end-of-text token the tokenizer knows (END_TOKENS), or None."""
  return next((tok.token_to_id(t) for t in END_TOKENS if tok.token_to_id(t) is not None), None)


def _dtype_for(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# --------------------------------------------------------------------------------------------------
# Token memmaps.


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def _pieces(text: str) -> list[str]:
  """Cuts a long text at line ends into ~1 MB pieces, so one big file still encodes in parallel.

  Byte-level BPE is lossless, so the concatenated ids of the pieces decode to the whole text.
  """
  if len(text) <= _ENCODE_PIECE_BYTES:
    return [text]
  out, start = [], 0
  while start < len(text):
    end = text.find("\n", start + _ENCODE_PIECE_BYTES)
    end = len(text) if end < 0 else end + 1
    out.append(text[start:end])
    start = end
  return out


def _encode_to_file(tok: tokenizers.Tokenizer, docs: list[_Doc], path: pathlib.Path,
                    dtype: np.dtype, *, desc: str, progress: bool) -> int:
  """Encodes documents, each followed by <|endoftext|>, into a raw token file; returns the count."""
  eot = np.array([] if eot_token_id(tok) is None else [eot_token_id(tok)], dtype)
  # (text, ends_a_document) pieces in corpus order.
  pieces = []
  for doc in docs:
    parts = _pieces(doc.text)
    pieces += [(p, i == len(parts) - 1) for i, p in enumerate(parts)]
  total_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
  n = 0
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f, tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc,
                                  disable=not progress) as bar:
    for lo in range(0, len(pieces), _ENCODE_CHUNK):
      chunk = pieces[lo:lo + _ENCODE_CHUNK]
      encs = tok.encode_batch([p for p, _ in chunk], add_special_tokens=False)
      arrays = []
      for (_, ends_doc), enc in zip(chunk, encs):
        arrays.append(np.asarray(enc.ids, dtype))
        if ends_doc:
          arrays.append(eot)
      out = np.concatenate(arrays)
      f.write(out.tobytes())
      n += out.size
      bar.update(sum(len(p.encode("utf-8")) for p, _ in chunk))
  os.replace(tmp, path)
  return n


def _load_tokens(folder: pathlib.Path, split: str, fingerprint: str,
                 vocab_size: int) -> np.ndarray | None:
  """The cached memmap of a split, or None when it is missing or stale."""
  meta_path, bin_path = folder / f"{split}.json", folder / f"{split}.bin"
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, ValueError):
    return None
  if (meta.get("fingerprint") != fingerprint or meta.get("vocab_size") != vocab_size
      or meta.get("format") != FORMAT_VERSION or not bin_path.exists()):
    return None
  dtype, n = np.dtype(meta["dtype"]), int(meta["num_tokens"])
  if bin_path.stat().st_size != n * dtype.itemsize:
    return None
  return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))


# --------------------------------------------------------------------------------------------------
# Dataset.


class Dataset:
  """A tokenized corpus: the tokenizer, train and val token streams, and seeded batches.

  Attributes:
    tokenizer: the byte-level BPE.
    train: token ids of the train split [T_train], a read-only memmap (uint16 or uint32).
    val: token ids of the validation split [T_val].
    vocab_size: `tokenizer.get_vocab_size()`; may be below the configured size on a small corpus.
    eot_id: id of `<|endoftext|>` (0), which follows every document in the streams.
    pad_id: id of `<|pad|>` (1), never in the streams.
    fingerprint: content hash of the split corpus.
    corpus: `corpus_summary` with the fingerprint: split bytes, packages and versions ({} if none).
    path: cache folder, or None.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, train: np.ndarray, val: np.ndarray,
               *, fingerprint: str = "", path: pathlib.Path | None = None,
               corpus: dict | None = None):
    self.tokenizer = tokenizer
    self.train = train
    self.val = val
    self.vocab_size = tokenizer.get_vocab_size()
    self.eot_id = eot_token_id(tokenizer)
    self.pad_id = tokenizer.token_to_id(PAD)
    self.fingerprint = fingerprint
    self.corpus = corpus or {}
    self.path = path

  def __repr__(self) -> str:
    return (f"Dataset(vocab_size={self.vocab_size}, train={self.train.size} tokens, "
            f"val={self.val.size} tokens, path={self.path})")

  def summary(self) -> dict:
    """What a results file records of the corpus: source, split bytes and tokens, package
    count and the fingerprint."""
    c = self.corpus
    return {"source": c.get("source"), "train_bytes": c.get("train_bytes"),
            "val_bytes": c.get("val_bytes"), "packages": len(c.get("packages", [])),
            "train_tokens": int(self.train.size), "val_tokens": int(self.val.size),
            "fingerprint": self.fingerprint}

  def tokens(self, split: str) -> np.ndarray:
    """The token stream of 'train' or 'val'."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return self.train if split == "train" else self.val

  def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int,
            rows: slice | None = None) -> np.ndarray:
    """Random windows of the token stream; those of a step depend only on (seed, split, step).

    Args:
      split: 'train' or 'val'.
      step: the step (or eval batch index), >= 0; a resumed run gets the same batches again.
      batch_size: B, windows per batch.
      seq_len: L, so that inputs = out[:, :-1] and targets = out[:, 1:].
      seed: the data seed, >= 0.
      rows: read only these rows of the batch (a process's shard); the batch is the same.

    Returns:
      int32 [B, L + 1] (or the rows asked for): each row a contiguous slice of the split's
      token stream.
    """
    data = self.tokens(split)
    for name, value, low in (("step", step, 0), ("seed", seed, 0), ("batch_size", batch_size, 1),
                             ("seq_len", seq_len, 1)):
      if int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    n = data.shape[0]
    if n < seq_len + 1:
      raise ValueError(f"split {split!r} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                       "use a shorter seq_len or a bigger corpus")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(step)])
    starts = rng.integers(0, n - seq_len, size=batch_size)[rows or slice(None)]  # start+L+1 <= n
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)

  def encode(self, text: str) -> list[int]:
    """Token ids of a text, without special tokens added."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Text of token ids (a list or array); special tokens are kept in the text."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                 skip_special_tokens=False)


def prepare(cfg: DataConfig, progress: bool = True) -> Dataset:
  """Reads the corpus, trains or loads the tokenizer and builds or loads the token memmaps.

  The tokenizer is trained on the train split only, once per (corpus fingerprint, vocab_size), and
  cached with the memmaps in `cfg.cache_dir/<fingerprint[:16]>-v<vocab_size>/` (tokenizer.json,
  {train,val}.bin and .json meta, corpus.json: `corpus_summary`, fingerprint and the files of each
  split). Files are written to a temporary name and renamed.

  Args:
    cfg: the data config.
    progress: show tqdm bars while training and encoding.

  Returns:
    The dataset, with memmapped token streams.
  """
  docs = _read_docs(cfg.source, cfg.max_bytes)
  splits = _split_docs(docs, cfg.val_fraction, cfg.source)
  fingerprint = _fingerprint(splits)
  summary = {**corpus_summary(cfg.source, splits), "fingerprint": fingerprint}
  tag = f"v{cfg.vocab_size}"
  if cfg.tokenizer is not None:  # a given tokenizer: cached per its content
    tag = "t" + hashlib.sha256(pathlib.Path(cfg.tokenizer).read_bytes()).hexdigest()[:16]
  folder = pathlib.Path(cfg.cache_dir).expanduser() / f"{fingerprint[:16]}-{tag}"
  folder.mkdir(parents=True, exist_ok=True)

  tok_path = folder / "tokenizer.json"
  if cfg.tokenizer is not None:
    tok = tokenizers.Tokenizer.from_file(str(cfg.tokenizer))
  elif tok_path.exists():
    tok = load_tokenizer(tok_path)
  else:
    log.info("training a %d-token BPE on %d train files of %s", cfg.vocab_size,
             len(splits["train"]), cfg.source)
    tok = _train_tokenizer((d.text for d in splits["train"]), cfg.vocab_size,
                           length=len(splits["train"]), progress=progress)
    tmp = tok_path.with_name(f"tokenizer.json.tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, tok_path)
  if not (folder / "corpus.json").exists():
    _atomic_write_text(folder / "corpus.json", json.dumps({
        **summary, "val_fraction": cfg.val_fraction, "max_bytes": cfg.max_bytes,
        **{f"{s}_files": [d.key for d in splits[s]] for s in SPLITS}}, indent=1))
  vocab_size = tok.get_vocab_size()

  streams = {}
  for split in SPLITS:
    tokens = _load_tokens(folder, split, fingerprint, vocab_size)
    if tokens is None:
      dtype = _dtype_for(vocab_size)
      n = _encode_to_file(tok, splits[split], folder / f"{split}.bin", dtype,
                          desc=f"encode {split}", progress=progress)
      meta = {"num_tokens": n, "dtype": dtype.name, "vocab_size": vocab_size,
              "fingerprint": fingerprint, "format": FORMAT_VERSION,
              "num_docs": len(splits[split]),
              "num_bytes": sum(len(d.text.encode("utf-8")) for d in splits[split])}
      _atomic_write_text(folder / f"{split}.json", json.dumps(meta, indent=1))
      tokens = _load_tokens(folder, split, fingerprint, vocab_size)
      assert tokens is not None, f"failed to re-load the tokens just written to {folder}"
    streams[split] = tokens
  return Dataset(tok, streams["train"], streams["val"], fingerprint=fingerprint, path=folder,
                 corpus=summary)
