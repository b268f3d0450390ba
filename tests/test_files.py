"""Files written in place are written whole or not at all; a killed write's temp file is cleaned up."""
import os

import pytest

from gpt_toolkit.files import atomic_write, atomic_write_text, remove_stale_temps, replace_together, temp_path


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


def test_stale_temps_of_a_killed_write_are_removed(tmp_path):
    stale = temp_path(tmp_path / "ckpt.pt").with_name(".ckpt.pt.tmp99999")
    stale.write_bytes(b"torn")
    keep = tmp_path / "notes.tmp.txt"
    keep.write_text("a user's file")
    remove_stale_temps(tmp_path)
    assert not stale.exists() and keep.exists()
    assert temp_path(tmp_path / "x.png").name == f".x.png.tmp{os.getpid()}"
