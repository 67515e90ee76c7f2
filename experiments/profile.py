"""Summarise a profiler trace: GPU kernel time by kernel, and idle time between kernels.

    python -m experiments.profile results/prof_train.xplane.pb [--top 25] [--steps 3]

Reads the .xplane.pb that the benchmarks' `--profile` writes (JAX's profiler format, the XSpace
protobuf), with a small wire-format reader so that no profiler package is needed: per device
stream, the time each kernel name took in total, and the gaps where the device sat idle.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass

from google.protobuf.internal import decoder


def _fields(buf: bytes):
  """(field number, value) pairs of one protobuf message; values are ints or bytes."""
  i, n = 0, len(buf)
  while i < n:
    key, i = decoder._DecodeVarint(buf, i)
    num, wire = key >> 3, key & 7
    if wire == 0:
      v, i = decoder._DecodeVarint(buf, i)
    elif wire == 2:
      size, i = decoder._DecodeVarint(buf, i)
      v, i = buf[i:i + size], i + size
    elif wire == 1:
      v, i = buf[i:i + 8], i + 8
    elif wire == 5:
      v, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield num, v


@dataclass
class Event:
  name: str
  start_ps: int
  duration_ps: int


def device_events(path: str) -> dict[str, list[Event]]:
  """{'<plane> / <line>': events} for every /device:* plane of an XSpace file.

  Field numbers from tsl/profiler/protobuf/xplane.proto: XSpace.planes=1; XPlane.name=2,
  lines=3, event_metadata=4 (map id -> XEventMetadata{id=1, name=2}); XLine.name=2,
  timestamp_ns=3, events=4; XEvent.metadata_id=1, offset_ps=2, duration_ps=3.
  """
  data = open(path, "rb").read()
  out: dict[str, list[Event]] = {}
  for num, plane in _fields(data):
    if num != 1:
      continue
    pf = list(_fields(plane))
    name = next((v.decode() for n, v in pf if n == 2), "")
    if not name.startswith("/device:"):
      continue
    meta = {}
    for n, entry in pf:
      if n == 4:  # map entry: key=1, value=2 (XEventMetadata)
        for k, v in _fields(entry):
          if k == 2:
            md = dict(_fields(v))
            meta[md.get(1, 0)] = md.get(2, b"?").decode(errors="replace")
    for n, line in pf:
      if n != 3:
        continue
        # (unreachable)
      lf = list(_fields(line))
      lname = next((v.decode() for k, v in lf if k == 2), "")
      base = next((v for k, v in lf if k == 3), 0) * 1000
      evs = []
      for k, ev in lf:
        if k == 4:
          e = dict(_fields(ev))
          evs.append(Event(meta.get(e.get(1, 0), "?"), base + e.get(2, 0), e.get(3, 0)))
      if evs:
        out[f"{name} / {lname}"] = sorted(evs, key=lambda e: e.start_ps)
  return out


def summarise(path: str, top: int = 25) -> str:
  lines = []
  for stream, evs in device_events(path).items():
    busy = sum(e.duration_ps for e in evs)
    span = evs[-1].start_ps + evs[-1].duration_ps - evs[0].start_ps
    lines.append(f"{stream}: {len(evs)} kernels, busy {busy / 1e9:.2f} ms of "
                 f"{span / 1e9:.2f} ms ({100 * busy / max(span, 1):.1f}%)")
    by_name = collections.defaultdict(lambda: [0, 0])
    for e in evs:
      by_name[e.name][0] += e.duration_ps
      by_name[e.name][1] += 1
    for name, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
      lines.append(f"  {t / 1e9:9.3f} ms {100 * t / max(busy, 1):5.1f}%  x{c:<6d} {name[:90]}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(prog="python -m experiments.profile")
  ap.add_argument("trace")
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args(argv)
  print(summarise(args.trace, args.top))


if __name__ == "__main__":
  main()
