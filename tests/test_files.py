"""distdeer.files: a whole-file write either lands completely or leaves the old file as it was."""

import os

import pytest

from distdeer.files import write_atomic


def test_write_atomic_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "eval.json"
    write_atomic(str(path), "first")
    write_atomic(str(path), "second\n")
    assert path.read_text() == "second\n"
    assert os.listdir(tmp_path) == ["eval.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "hosts.json"
    write_atomic(str(path), "old")

    class Unwritable:  # f.write raises TypeError half way through the write path
        pass

    with pytest.raises(TypeError):
        write_atomic(str(path), Unwritable())
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["hosts.json"]


def test_a_missing_directory_is_an_error_not_a_silent_success(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(str(tmp_path / "absent" / "config.yaml"), "x")
    assert not (tmp_path / "absent").exists()
