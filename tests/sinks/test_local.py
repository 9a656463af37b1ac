"""LocalDirectorySink: write into a temporary sibling, rename on commit, remove on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge_service.sinks.local import LocalDirectorySink, copy_model_files, destination_problems
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
