"""LocalDirectorySink: write into a temporary sibling, rename on commit, remove on failure."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merge_service.sinks.local import (
    LocalDirectorySink,
    _exchange,
    copy_model_files,
    destination_problems,
    recover_interrupted,
    replace_by_renames,
)
from tests.conftest import assert_nothing_written, leftovers


def test_commit_moves_the_temporary_directory_into_place(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "merged"  # the parent does not exist yet
    sink = LocalDirectorySink(dest)
    with sink as tmp:
        assert tmp.parent == dest.parent
        assert tmp.name.startswith(".merged.partial-")
        (tmp / "model.safetensors").write_bytes(b"x")
        assert not dest.exists()
        sink.commit()
    assert (dest / "model.safetensors").read_bytes() == b"x"
    assert leftovers(dest) == []


def test_leaving_without_commit_removes_everything(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    with LocalDirectorySink(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "file").write_text("partial")
    assert_nothing_written(dest)


def test_an_exception_aborts_and_propagates(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"), LocalDirectorySink(dest) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert_nothing_written(dest)


def test_parents_made_for_the_output_go_with_it(tmp_path: Path) -> None:
    """An interrupted merge into new/sub/merged leaves no new/ behind; a parent that something
    else wrote into meanwhile stays, and so does one that was there before."""
    (tmp_path / "new").mkdir()
    dest = tmp_path / "new" / "a" / "b" / "merged"
    with pytest.raises(KeyboardInterrupt), LocalDirectorySink(dest):
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["new"]
    assert list((tmp_path / "new").iterdir()) == []
    with pytest.raises(KeyboardInterrupt), LocalDirectorySink(dest):
        (tmp_path / "new" / "a" / "other").write_text("someone else's")
        raise KeyboardInterrupt
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "new", "new/a", "new/a/other"]


def test_an_existing_destination_is_kept_on_abort(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old").write_text("keep me")
    with pytest.raises(RuntimeError), LocalDirectorySink(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("partial")
        raise RuntimeError("failed mid-way")
    assert [p.name for p in dest.iterdir()] == ["old"]
    assert leftovers(dest) == []


def test_overwrite_replaces_the_whole_directory(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "stale.safetensors").write_text("old")
    sink = LocalDirectorySink(dest, overwrite=True)
    with sink as tmp:
        (tmp / "model.safetensors").write_text("new")
        sink.commit()
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]
    assert leftovers(dest) == []


def test_without_overwrite_a_destination_that_appeared_is_not_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    sink = LocalDirectorySink(dest, overwrite=False)
    with sink as tmp:
        (tmp / "model.safetensors").write_text("new")
        dest.mkdir()  # someone else wrote it while we merged
        (dest / "theirs").write_text("theirs")
        with pytest.raises(FileExistsError):
            sink.commit()
    assert [p.name for p in dest.iterdir()] == ["theirs"]
    assert leftovers(dest) == []


def test_two_sinks_to_one_destination_use_distinct_temporaries(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    with LocalDirectorySink(dest) as a, LocalDirectorySink(dest) as b:
        assert a != b and a.is_dir() and b.is_dir()
    assert_nothing_written(dest)


def test_destination_problems(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    assert destination_problems(dest, overwrite=False) == []
    assert destination_problems(tmp_path / "a" / "b" / "c", overwrite=False) == []
    dest.mkdir()
    [problem] = destination_problems(dest, overwrite=False)
    assert problem.field == "output.destination"
    assert "already exists" in problem.message and "--overwrite" in problem.message
    assert destination_problems(dest, overwrite=True) == []
    afile = tmp_path / "file"
    afile.write_text("x")
    [problem] = destination_problems(afile, overwrite=True)
    assert "is a file" in problem.message


def test_destination_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    [problem] = destination_problems(afile / "sub" / "merged", overwrite=False)
    assert problem.field == "output.destination"
    assert "cannot create" in problem.message and str(afile) in problem.message


def test_a_place_that_refuses_new_directories_is_found_at_preflight(tmp_path: Path) -> None:
    """Tried, not asked: root passes os.access everywhere, yet /proc takes no directory."""
    [problem] = destination_problems(Path("/proc/merge-service-test/out"), overwrite=False)
    assert "cannot create" in problem.message and "/proc is not writable" in problem.message
    assert destination_problems(tmp_path / "fine", overwrite=False) == []
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing


def test_copy_model_files_skips_weights_cards_and_hidden_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "1_Pooling").mkdir(parents=True)
    (src / ".cache").mkdir()
    dst.mkdir()
    files = {"config.json": "{}", "tokenizer.json": "{}", "vocab.txt": "a", "README.md": "card",
             ".gitattributes": "*", "model.safetensors": "w", "pytorch_model.bin": "w",
             "model.safetensors.index.json": "{}", "1_Pooling/config.json": "{}",
             ".cache/x.json": "{}", "tokenizer.model": "sp"}
    for name, text in files.items():
        (src / name).write_text(text)
    copied = copy_model_files(src, dst)
    assert sorted(copied) == ["1_Pooling/config.json", "config.json", "tokenizer.json",
                              "tokenizer.model", "vocab.txt"]
    assert (dst / "1_Pooling" / "config.json").read_text() == "{}"
    assert not (dst / "README.md").exists()


# --------------------------------------------------------------------------------------------
# replacing an existing output: never an empty destination


def test_the_swap_exchanges_two_directories_in_one_step(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    if not _exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this kernel or file system")
    assert (a / "which").read_text() == "b" and (b / "which").read_text() == "a"


def test_two_renames_put_the_previous_output_back_when_the_second_fails(tmp_path: Path
                                                                        ) -> None:
    """The new output vanished before its rename (a tmp cleaner, a full disk's cleanup):
    the old one was already moved aside, and must come back."""
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "model.safetensors").write_text("previous output")
    old = tmp_path / ".merged.old-test"
    with pytest.raises(FileNotFoundError):
        replace_by_renames(tmp_path / ".merged.partial-gone", dest, old)
    assert (dest / "model.safetensors").read_text() == "previous output"
    assert not old.exists()


def test_two_renames_replace_the_destination(tmp_path: Path) -> None:
    dest, new, old = tmp_path / "merged", tmp_path / "new", tmp_path / ".merged.old-test"
    dest.mkdir()
    new.mkdir()
    (dest / "f").write_text("old")
    (new / "f").write_text("new")
    replace_by_renames(new, dest, old)
    assert (dest / "f").read_text() == "new" and (old / "f").read_text() == "old"


def test_a_failed_replace_keeps_the_previous_output(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "model.safetensors").write_text("previous output")
    sink = LocalDirectorySink(dest, overwrite=True)
    with sink as tmp:
        (tmp / "model.safetensors").write_text("new")
        shutil.rmtree(tmp)  # removed under us before the commit
        with pytest.raises(FileNotFoundError):
            sink.commit()
    assert [p.name for p in dest.iterdir()] == ["model.safetensors"]
    assert (dest / "model.safetensors").read_text() == "previous output"
    assert leftovers(dest) == []


# --------------------------------------------------------------------------------------------
# siblings a killed run left (SIGKILL, power loss)


def _killed(code: str) -> None:
    """Run `code` in a process that then dies by SIGKILL, leaving whatever it made."""
    done = subprocess.run([sys.executable, "-c", "import os, signal; from pathlib import Path\n"
                           f"{code}\nos.kill(os.getpid(), signal.SIGKILL)"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr


def _enter_sink(dest: Path) -> str:
    return ("from pathlib import Path\n"
            "from merge_service.sinks.local import LocalDirectorySink\n"
            f"tmp = LocalDirectorySink(Path({str(dest)!r})).__enter__()\n"
            "(tmp / 'model.safetensors').write_text('partial')")


def test_a_partial_output_of_a_killed_merge_is_removed_when_a_sink_starts(tmp_path: Path
                                                                          ) -> None:
    dest = tmp_path / "merged"
    _killed(_enter_sink(dest))
    [stale] = leftovers(dest)
    with LocalDirectorySink(dest) as tmp:
        assert leftovers(dest) == [tmp.name]
    assert_nothing_written(dest)
    assert stale not in leftovers(dest)


def test_a_partial_output_of_a_running_merge_is_kept(tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    code = _enter_sink(dest) + "\nimport sys; sys.stdout.write('ready\\n'); sys.stdout.flush()" \
                               "\nsys.stdin.read()"
    running = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert running.stdout is not None and running.stdout.readline() == "ready\n"
        [theirs] = leftovers(dest)
        with LocalDirectorySink(dest) as tmp:
            assert sorted(leftovers(dest)) == sorted([theirs, tmp.name])
        assert destination_problems(dest, overwrite=False) == []
        assert leftovers(dest) == [theirs]
    finally:
        running.communicate("", timeout=30)  # it ends without cleaning up, as if killed
    assert destination_problems(dest, overwrite=False) == []
    assert leftovers(dest) == []  # its owner is gone: removed


def test_a_sibling_whose_owner_cannot_be_told_is_removed_only_when_old(tmp_path: Path) -> None:
    """Another host's or an older version's name: no pid to check, only its age."""
    dest = tmp_path / "merged"
    stale = tmp_path / ".merged.partial-0a1b2c3d"
    stale.mkdir()
    (stale / "model.safetensors").write_text("partial")
    recover_interrupted(dest)
    assert stale.is_dir()  # fresh: maybe a merge running elsewhere
    time.sleep(0.05)
    recover_interrupted(dest, stale_after_s=0.01)
    assert not stale.exists()


def test_a_previous_output_a_killed_replace_moved_aside_is_restored(tmp_path: Path) -> None:
    """Killed between the two renames: the destination is missing, its old output hidden."""
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "model.safetensors").write_text("previous output")
    _killed("from merge_service.sinks.local import _sibling\n"
            f"dest = Path({str(dest)!r}); dest.rename(_sibling(dest, 'old'))")
    assert not dest.exists() and len(leftovers(dest)) == 1
    # preflight settles it first, so that it sees the destination the user has
    [problem] = destination_problems(dest, overwrite=False)
    assert "already exists" in problem.message
    assert (dest / "model.safetensors").read_text() == "previous output"
    assert leftovers(dest) == []


def test_a_replaced_output_a_killed_merge_left_is_removed(tmp_path: Path) -> None:
    """Killed after the two renames, before the old output was deleted."""
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "model.safetensors").write_text("previous output")
    _killed("from merge_service.sinks.local import _sibling\n"
            f"dest = Path({str(dest)!r}); dest.rename(_sibling(dest, 'old'))\n"
            "dest.mkdir(); (dest / 'model.safetensors').write_text('new output')")
    sink = LocalDirectorySink(dest, overwrite=True)
    with sink as tmp:
        assert leftovers(dest) == [tmp.name]
        (tmp / "model.safetensors").write_text("newer output")
        sink.commit()
    assert (dest / "model.safetensors").read_text() == "newer output"
    assert leftovers(dest) == []


# --------------------------------------------------------------------------------------------
# a mount point (a docker volume) cannot be renamed over


def test_a_mount_point_is_refused_at_preflight() -> None:
    proc = Path("/proc")
    if not os.path.ismount(proc):
        pytest.skip("no /proc mount here")
    for overwrite in (False, True):  # said first: --overwrite would not help
        [problem] = destination_problems(proc, overwrite=overwrite)
        assert problem.field == "output.destination"
        assert "/proc is a mount point" in problem.message
