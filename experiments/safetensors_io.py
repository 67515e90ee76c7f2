"""The safetensors format read and written with NumPy alone (bfloat16 through ml_dtypes).

A file is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}} and the raw little-endian tensor bytes.
Reading memory-maps the file, so a shard is never loaded whole; every size is checked against
the file, and a problem is a one-line SafetensorsError naming the file (and tensor).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A malformed, truncated or unexpected safetensors file."""


def read_header(path: Path) -> tuple[dict[str, dict], int]:
  """-> ({tensor name: {"dtype", "shape", "data_offsets"}}, offset of the data in the file)."""
  path = Path(path)
  size = path.stat().st_size
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{path}: not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise SafetensorsError(f"{path}: header of {n} bytes runs past the end of the file")
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise SafetensorsError(f"{path}: the header is not JSON") from None
  header.pop("__metadata__", None)
  for name, info in header.items():
    if info.get("dtype") not in DTYPES:
      raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
    begin, end = info["data_offsets"]
    want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(DTYPES[info["dtype"]]).itemsize
    if end - begin != want or 8 + n + end > size:
      raise SafetensorsError(f"{path}: tensor {name} needs bytes {begin}..{end} of a data section "
                             f"of {size - 8 - n} bytes (truncated or corrupt file)")
  return header, 8 + n


def read_metadata(path: Path) -> dict[str, str]:
  """The header's "__metadata__" mapping ({} when there is none)."""
  with Path(path).open("rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)).get("__metadata__", {})


def read_tensor(path: Path, name: str, header: dict[str, dict], offset: int) -> np.ndarray:
  """The tensor `name` of the file, memory-mapped (read-only)."""
  info = header[name]
  begin, _ = info["data_offsets"]
  return np.memmap(path, dtype=DTYPES[info["dtype"]], mode="r", offset=offset + begin,
                   shape=tuple(info["shape"]))


def write_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
               ) -> None:
  """Writes tensors (in the given order) as one safetensors file."""
  header, pos = {}, 0
  for name, x in tensors.items():
    nbytes = x.size * x.dtype.itemsize
    header[name] = {"dtype": NAMES[x.dtype], "shape": list(x.shape),
                    "data_offsets": [pos, pos + nbytes]}
    pos += nbytes
  if metadata:
    header["__metadata__"] = metadata
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
  with Path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for x in tensors.values():
      f.write(np.ascontiguousarray(x).tobytes())
