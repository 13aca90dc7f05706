"""Whole-file writes that a crash cannot leave half done.

Standard library only, so that every writer of a run directory uses it — the training loop, the
evaluation, and the Ray driver (``distdeer.group``), which must not import Orbax.
"""

from __future__ import annotations

import contextlib
import os


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never a
    part: written beside it, flushed to disk, then renamed over it (and the rename itself flushed).

    Without the fsyncs a power loss after the rename can leave a zero-length file on ext4/xfs."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # best effort: some network and FUSE file systems refuse this
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
