"""Collectives read from a compiled XLA program's HLO text: what a step exchanges between devices.

Each collective instruction's result shape gives the bytes it delivers to each device.  Asynchronous
collectives appear as ``-start``/``-done`` pairs; the ``-start`` is counted, the ``-done`` not.  A
collective inside a loop body (a Newton iteration) is counted once: the sums are per pass of the
program's code, not multiplied by iteration counts.
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all", "collective-broadcast",
         "ragged-all-to-all")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")(?:-start)?\(", re.M)
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"f32": 4, "f64": 8, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s64": 8,
          "u64": 8}


def collectives(hlo: str) -> list[tuple[str, str, int]]:
    """(instruction name, kind, result bytes) of every collective in an HLO module."""
    out = []
    for name, result, kind in _INSTR.findall(hlo):
        size = sum((int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1) * _BYTES.get(dtype, 4)
                   for dtype, dims in _SHAPE.findall(result))
        out.append((name, kind, size))
    return out


def collective_bytes(hlo: str) -> dict[str, int]:
    """Result bytes of every collective, summed per kind."""
    out: dict[str, int] = {}
    for _, kind, size in collectives(hlo):
        out[kind] = out.get(kind, 0) + size
    return out
