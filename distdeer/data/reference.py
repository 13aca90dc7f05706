"""The reference benchmark series: fetched from their public source, never shipped with distdeer.

The GTF benchmark (Hess et al., ICML 2023) published its datasets in the repository
DurstewitzLab/GTF-shPLRNN (folder ``ICML2023_datasets``); its repository states no license and the ECG is
a human recording, so distdeer does not copy them.  ``distdeer data fetch NAME`` downloads a series'
files from one pinned commit of that repository into the data directory and checks each file's sha256.

* data directory: ``$DISTDEER_DATA``, else ``~/.cache/distdeer/data``;
* source: ``$DISTDEER_DATA_URL`` (a mirror holding the same paths), else the pinned commit on GitHub;
* configs and commands name a fetched file as ``ref:FILE`` (``data.path: ref:lorenz63_test.npy``);
  :func:`resolve` turns that into its path in the data directory, or says which fetch command is missing.

Each file is a NumPy array (time, dimension) of 100 000 steps, standardised per dimension.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import NamedTuple

from distdeer.data.store import DataError

SOURCE = "https://raw.githubusercontent.com/DurstewitzLab/GTF-shPLRNN/63ac00d84f237d5ecf2f85d8447a198261aff0c0"
PREFIX = "ref:"


class File(NamedTuple):
    name: str  # file name in the data directory
    path: str  # path under the source
    sha256: str
    what: str


SERIES: dict[str, tuple[File, ...]] = {
    "lorenz63": (
        File("lorenz63_on0.05_train.npy", "ICML2023_datasets/Lorenz63/lorenz63_on0.05_train.npy",
             "2246dfc44bf3a02090cdb5264dd836c18143e5bac4297807f4c62e153a39c1eb",
             "Lorenz-63, dt 0.01, 5 % observation noise, 100 000 × 3 float32"),
        File("lorenz63_test.npy", "ICML2023_datasets/Lorenz63/lorenz63_test.npy",
             "21be3a05a58724c4c1bbdf419ac644c45e6a9fbbf4093108a70fd80f93d7b7e3",
             "an independent clean Lorenz-63 trajectory, 100 000 × 3 float32"),
    ),
    "ecg": (
        File("ECG_pecuzal_5d_train.npy", "ICML2023_datasets/ECG/ECG_pecuzal_5d_train.npy",
             "b79deb8b054486360233bb4cefdb154dc5f6b0a55b1a713cd76378606d936185",
             "5-d delay embedding of a human ECG, 100 000 × 5 float64"),
        File("ECG_pecuzal_5d_test.npy", "ICML2023_datasets/ECG/ECG_pecuzal_5d_test.npy",
             "7c17fe9b9e90d0610f817a53e73ec8389b30763ce36985cfcadc1459dd89c654",
             "a separate test segment of the same embedding, 100 000 × 5 float64"),
    ),
}


def data_dir() -> str:
    return os.environ.get("DISTDEER_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "distdeer", "data")


def series_of(name: str) -> str:
    """The series (``fetch`` name) a file belongs to."""
    for series, files in SERIES.items():
        if any(f.name == name for f in files):
            return series
    raise DataError(f"{PREFIX}{name}: not a reference file (known: "
                    + ", ".join(f.name for files in SERIES.values() for f in files) + ")")


def fetch_command(name: str) -> str:
    return f"distdeer data fetch {series_of(name)}"


def local(name: str) -> str | None:
    """Path of reference file ``name`` in the data directory, or None when it is not there."""
    path = os.path.join(data_dir(), name)
    return path if os.path.exists(path) else None


def resolve(path: str | None) -> str | None:
    """``ref:FILE`` → the file's path in the data directory (``DataError`` naming the fetch command when it
    has not been fetched); any other path unchanged."""
    if path is None or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    series = series_of(name)
    found = local(name)
    if found is None:
        raise DataError(f"{path}: not in {data_dir()}; run `distdeer data fetch {series}` (or set DISTDEER_DATA)")
    return found


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(series: str, directory: str | None = None, source: str | None = None,
          files: tuple[File, ...] | None = None, timeout: float = 60.0) -> list[str]:
    """Download ``series``' files (or ``files``) from ``source`` into ``directory`` and check their sha256.

    Files already present with the right checksum are kept.  Every file is checked before any is moved
    into place, so a failure (unknown series, a file missing at the source, no connection, a checksum
    mismatch, a different file already there) writes nothing and raises ``DataError`` with one line.
    Returns the files' paths."""
    if files is None:
        if series not in SERIES:
            raise DataError(f"unknown reference series {series!r} (known: {', '.join(SERIES)})")
        files = SERIES[series]
    directory = directory or data_dir()
    source = (source or os.environ.get("DISTDEER_DATA_URL") or SOURCE).rstrip("/")
    targets = [os.path.join(directory, f.name) for f in files]
    for f, target in zip(files, targets):
        if os.path.exists(target) and sha256_of(target) != f.sha256:
            raise DataError(f"{target} exists and is not the reference file (sha256 differs); remove it first")
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    try:
        return _download(files, targets, directory, source, timeout)
    except DataError:
        if created and not os.listdir(directory):
            os.rmdir(directory)  # leave no trace of a failed first fetch
        raise


def _download(files, targets, directory: str, source: str, timeout: float) -> list[str]:
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        staged = []
        for f, target in zip(files, targets):
            if os.path.exists(target):
                continue
            url = f"{source}/{f.path}"
            part = os.path.join(tmp, f.name)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as out:
                    while block := r.read(1 << 20):
                        out.write(block)
            except urllib.error.HTTPError as e:
                raise DataError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise DataError(f"cannot fetch {url}: {reason} (offline? set DISTDEER_DATA_URL to a mirror)") from None
            got = sha256_of(part)
            if got != f.sha256:
                raise DataError(f"{url}: sha256 {got} differs from the pinned {f.sha256}; nothing written")
            staged.append((part, target))
        for part, target in staged:
            os.replace(part, target)
    return targets
