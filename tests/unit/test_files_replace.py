"""files.replace_file, the one atomic write every writer uses: exact modes whatever the
umask, nothing half-written or left behind on failure, readers see old or new only."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from loden.files import replace_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
@pytest.mark.parametrize("wanted", [0o400, 0o600, 0o644, 0o755])
def test_exact_modes_whatever_the_umask(tmp_path: Path, umask: int, wanted: int) -> None:
    old = os.umask(umask)
    try:
        target = tmp_path / "a" / "b" / "file"
        replace_file(target, b"one", mode=wanted, dir_mode=0o700)
        replace_file(target, b"two", mode=wanted, dir_mode=0o700)  # over an existing file
    finally:
        os.umask(old)
    assert target.read_bytes() == b"two"
    assert (mode(target), mode(target.parent), mode(target.parent.parent)) == (wanted, 0o700, 0o700)
    assert sorted(p.name for p in target.parent.iterdir()) == ["file"]  # no temp file left


def test_without_parents_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        replace_file(tmp_path / "missing" / "file", b"x", parents=False)
    assert not (tmp_path / "missing").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "file"
    replace_file(target, b"old")
    with pytest.raises(TypeError):  # fails inside the write, after the temp file exists
        replace_file(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_readers_see_the_old_or_the_new_content_only(tmp_path: Path) -> None:
    target = tmp_path / "subnet.env"
    old, new = b"A" * 65536, b"B" * 65536
    replace_file(target, old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            replace_file(target, new if i % 2 else old)
    finally:
        stop.set()
        reader.join(10)
    assert seen <= {old, new}
