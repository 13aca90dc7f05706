"""``distdeer data fetch`` against a local HTTP server: a fetched file is checked by sha256; a checksum
mismatch, a file missing at the source, no connection, or a different file already in place is one line,
exit 2, and nothing written.  ``ref:FILE`` names resolve in the data directory or name the fetch command."""

import functools
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from distdeer.cli import main
from distdeer.data import reference
from test_multiprocess import free_port


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the directory it yields (the mirror's root) and its base URL."""
    root = tmp_path / "mirror"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the server's request log out of the command's output
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def put(root, rel: str, data: bytes) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_fetch_checks_and_keeps_files(server, tmp_path):
    root, url = server
    a, b = os.urandom(3000), os.urandom(5000)
    files = (reference.File("a.npy", "x/a.npy", put(root, "x/a.npy", a), "a"),
             reference.File("b.npy", "y/b.npy", put(root, "y/b.npy", b), "b"))
    out = tmp_path / "data"
    paths = reference.fetch("test", str(out), url, files)
    assert [open(p, "rb").read() for p in paths] == [a, b]
    assert sorted(os.listdir(out)) == ["a.npy", "b.npy"]  # no staging directory left behind
    (root / "x" / "a.npy").unlink()  # present files are kept, not fetched again
    assert reference.fetch("test", str(out), url, files) == paths


def fetch_cli(monkeypatch, capsys, data_dir, url) -> tuple[int, str]:
    monkeypatch.setenv("DISTDEER_DATA", str(data_dir))
    monkeypatch.setenv("DISTDEER_DATA_URL", url)
    code = main(["data", "fetch", "lorenz63"])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).strip()


def test_checksum_mismatch_writes_nothing(server, tmp_path, monkeypatch, capsys):
    root, url = server
    for f in reference.SERIES["lorenz63"]:
        put(root, f.path, b"not the reference series")
    code, out = fetch_cli(monkeypatch, capsys, tmp_path / "data", url)
    assert code == 2 and len(out.splitlines()) == 1 and "sha256" in out and "differs from the pinned" in out, out
    assert not (tmp_path / "data").exists()


def test_missing_at_source_and_offline(server, tmp_path, monkeypatch, capsys):
    root, url = server
    code, out = fetch_cli(monkeypatch, capsys, tmp_path / "data", url)  # the mirror is empty
    assert code == 2 and len(out.splitlines()) == 1 and "HTTP 404" in out, out
    code, out = fetch_cli(monkeypatch, capsys, tmp_path / "data", f"http://127.0.0.1:{free_port()}")  # nobody there
    assert code == 2 and len(out.splitlines()) == 1 and "cannot fetch" in out and "offline?" in out, out
    assert not (tmp_path / "data").exists()


def test_a_different_file_in_place_is_not_overwritten(server, tmp_path, monkeypatch, capsys):
    root, url = server
    data = tmp_path / "data"
    data.mkdir()
    mine = data / "lorenz63_test.npy"
    mine.write_bytes(b"my own file")
    code, out = fetch_cli(monkeypatch, capsys, data, url)
    assert code == 2 and "exists and is not the reference file" in out, out
    assert mine.read_bytes() == b"my own file" and os.listdir(data) == ["lorenz63_test.npy"]


def test_ref_names_resolve_or_name_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTDEER_DATA", str(tmp_path / "data"))
    run_dir = tmp_path / "run"
    code = main(["train", "configs/lorenz63-whole.yaml", f"run.dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "ref:lorenz63_on0.05_train.npy" in err and "distdeer data fetch lorenz63" in err
    assert not run_dir.exists()
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "lorenz63_test.npy", np.zeros((4, 3), np.float32))
    assert reference.resolve("ref:lorenz63_test.npy") == str(tmp_path / "data" / "lorenz63_test.npy")
    assert reference.resolve("plain/path.npy") == "plain/path.npy"


def test_fetch_of_the_real_files_from_a_mirror(server, tmp_path, monkeypatch, capsys):
    """With the reference files at hand (fetched before), served from a local mirror, the pinned
    checksums accept them."""
    root, url = server
    for f in reference.SERIES["lorenz63"]:
        if reference.local(f.name) is None:
            pytest.skip(f"reference series not in {reference.data_dir()}: run `distdeer data fetch lorenz63`")
        put(root, f.path, open(reference.local(f.name), "rb").read())
    code, out = fetch_cli(monkeypatch, capsys, tmp_path / "data", url)
    assert code == 0 and "ref:lorenz63_test.npy" in out, out
    assert sorted(os.listdir(tmp_path / "data")) == ["lorenz63_on0.05_train.npy", "lorenz63_test.npy"]
