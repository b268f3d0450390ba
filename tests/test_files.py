"""Files written in place are written whole or not at all; a killed write's temp file is cleaned up."""
import os
import subprocess
import sys

import pytest

from gpt_toolkit.core.files import (
    TEMP_MARKER,
    atomic_write,
    atomic_write_text,
    fingerprint,
    remove_stale_temps,
    replace_together,
    temp_path,
)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "table.md"
    atomic_write_text(target, "old\n")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"


def test_replace_together_renames_only_when_every_file_is_written(tmp_path):
    a, b = tmp_path / "train.bin", tmp_path / "val.bin"
    replace_together([a, b], lambda files: [files[a].write(b"A1"), files[b].write(b"B1")])
    with pytest.raises(TypeError):
        replace_together([a, b], lambda files: [files[a].write(b"A2"), files[b].write(None)])  # b cannot be written
    assert (a.read_bytes(), b.read_bytes()) == (b"A1", b"B1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "val.bin"]


def dead_pid():
    """The id of a process that has just exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_up_removes_only_our_temps_of_dead_writers(tmp_path):
    """A temp file's name carries its writer's pid and a marker; the clean-up removes those of dead writers only,
    and never a user's file, however much its name looks like a temp file."""
    assert temp_path(tmp_path / "x.png").name == f".x.png.{os.getpid()}.{TEMP_MARKER}"
    dead = tmp_path / f".ckpt.pt.{dead_pid()}.{TEMP_MARKER}"
    dead.write_bytes(b"torn")
    dead_dir = tmp_path / f".hf.{dead_pid()}.{TEMP_MARKER}"  # an export killed mid-write
    (dead_dir / "model.safetensors").parent.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"x" * 100)
    alive = temp_path(tmp_path / "latest.pt")  # this process is writing it
    alive.write_bytes(b"in flight")
    users = [".notes.tmp", ".plan.tmp.md", "notes.tmp.txt", f".mine.{TEMP_MARKER}", f".x.12.{TEMP_MARKER}.bak",
             ".ckpt.pt.tmp99999"]  # the last is what earlier versions named their temps: not provably ours
    for name in users:
        (tmp_path / name).write_text("a user's file")
    backup = tmp_path / ".backup.tmp_old"
    backup.mkdir()
    (backup / "ckpt.pt").write_bytes(b"kept")
    assert sorted(remove_stale_temps(tmp_path)) == sorted([dead.name, dead_dir.name])
    assert alive.exists() and (backup / "ckpt.pt").read_bytes() == b"kept"
    assert all((tmp_path / name).read_text() == "a user's file" for name in users)


def test_fingerprint_tells_files_apart_cheaply(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(bytes(range(256)) * 200_000)  # 51 MB: fingerprinted by 16 pieces of 1 MB
    b.write_bytes(a.read_bytes()[:-1] + b"x")  # the same size, one byte changed at the end
    assert fingerprint(a) == fingerprint(a) and fingerprint(a) != fingerprint(b)
    b.write_bytes(a.read_bytes()[:-2])  # truncated
    assert fingerprint(a) != fingerprint(b)
