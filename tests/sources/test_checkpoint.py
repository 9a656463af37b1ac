"""Full checkpoints: safetensors headers, truncation, shard indexes, unsupported formats."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from merge_service.sources.checkpoint import (
    Checkpoint,
    SafetensorsFileError,
    read_safetensors_header,
)
from tests.conftest import synthetic_tensors, write_checkpoint, write_sharded

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint64, torch.uint32, torch.uint16, torch.uint8,
          torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu]


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_header_gives_every_dtype_and_shape(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.zeros(i + 1, 2).to(dtype) for i, dtype in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(1.0)
    tensors["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "model.safetensors")
    assert {n: (i.dtype, i.shape) for n, i in header.items()} == \
        {n: (v.dtype, tuple(v.shape)) for n, v in tensors.items()}
    assert header["scalar"].numel == 1 and header["empty"].numel == 0
    assert header["t0"].is_float and not header["t4"].is_float  # float64 / int64
    assert all(i.file == tmp_path / "model.safetensors" for i in header.values())


def test_unsigned_tensors_are_read_exactly(tmp_path: Path) -> None:
    """U16/U32/U64 (safetensors dtypes since torch 2.3): each value, the largest included."""
    tensors = {f"u{dtype.itemsize * 8}": torch.tensor([0, 1, 2**(dtype.itemsize * 8) - 1],
                                                      dtype=dtype)
               for dtype in (torch.uint16, torch.uint32)}
    tensors["u64"] = torch.tensor([0, 1, 2**63 - 1], dtype=torch.uint64)
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt, problems = Checkpoint.open(tmp_path, "base")
    assert problems == [] and ckpt is not None
    for name, value in tensors.items():
        got = ckpt.get(name)
        assert got.dtype == value.dtype and got.tolist() == value.tolist()
    ckpt.close()


def test_checkpoint_reads_tensors_lazily_and_exactly(tmp_path: Path) -> None:
    tensors = synthetic_tensors(3)
    write_checkpoint(tmp_path, tensors)
    ckpt, problems = Checkpoint.open(tmp_path, "base")
    assert problems == [] and ckpt is not None
    assert set(ckpt.tensors) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(ckpt.get(name), value)
    assert ckpt.floating_dtype() == torch.float32
    assert ckpt.nbytes() == sum(v.numel() * v.element_size() for v in tensors.values())
    ckpt.close()


def test_prefetch_is_advice_only(tmp_path: Path) -> None:
    """`prefetch` takes any name (unknown, empty tensor) and leaves what `get` reads as it was;
    it opens each file once, like `get`."""
    tensors = {"a": torch.randn(64, 32), "b": torch.arange(10), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint, problems = Checkpoint.open(tmp_path, "m")
    assert checkpoint is not None and not problems
    for name in ("a", "b", "empty", "not-there"):
        checkpoint.prefetch(name)
    assert len(checkpoint._handles) == 1
    for name, value in tensors.items():
        assert torch.equal(checkpoint.get(name), value)
    checkpoint.close()


def test_read_ahead_returns_what_get_reads(tmp_path: Path) -> None:
    """A tensor read ahead in a thread is what `get` returns once (then `get` reads again);
    closing with reads still queued or in flight waits for them and closes every file."""
    tensors = {f"t{i}": torch.randn(256, 64) for i in range(8)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint, _ = Checkpoint.open(tmp_path, "m")
    assert checkpoint is not None
    with ThreadPoolExecutor(1) as reader:
        checkpoint.read_ahead("t0", reader)
        checkpoint.read_ahead("t0", reader)  # already on its way: not read twice
        assert list(checkpoint._ahead) == ["t0"]
        first = checkpoint.get("t0")
        assert torch.equal(first, tensors["t0"]) and not checkpoint._ahead
        second = checkpoint.get("t0")
        assert torch.equal(second, tensors["t0"]) and second.data_ptr() != first.data_ptr()
        for name in tensors:
            checkpoint.read_ahead(name, reader)
        checkpoint.close()
        assert not checkpoint._ahead and not checkpoint._handles


def test_floating_dtype_is_the_majority_by_size(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"big": torch.zeros(100, dtype=torch.bfloat16),
                                "norm": torch.zeros(10, dtype=torch.float32),
                                "ids": torch.zeros(1000, dtype=torch.int64)})
    ckpt, _ = Checkpoint.open(tmp_path, "base")
    assert ckpt is not None and ckpt.floating_dtype() == torch.bfloat16


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_files_are_detected_before_reading(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, path)
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:max(header_end + 1, int(len(data) * keep))])
    with pytest.raises(SafetensorsFileError, match="truncated"):
        read_safetensors_header(path)
    _, problems = Checkpoint.open(tmp_path, "task1")
    assert len(problems) == 1
    assert problems[0].model == "task1"
    assert "model.safetensors" in problems[0].message and "truncated" in problems[0].message


@pytest.mark.parametrize(("data", "message"), [
    (b"", "shorter than a safetensors header"),
    (b"\x01\x02\x03", "shorter than a safetensors header"),
    (struct.pack("<Q", 10**6) + b"{}", "beyond the end of the file"),
    (struct.pack("<Q", 2**63) + b"{}", "beyond the end of the file"),
    (struct.pack("<Q", 8) + b"not json", "not valid JSON"),
    (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (b"\x89PNG garbage bytes that are not a model at all" * 4, "beyond the end of the file"),
])
def test_corrupt_headers(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsFileError, match=message):
        read_safetensors_header(path)


@pytest.mark.parametrize(("entry", "message"), [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, "does not match its shape"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}, "does not match its shape"),
    ({"dtype": "U16", "shape": [2, 2], "data_offsets": [0, 16]},
     r"does not match its shape \(16 bytes; U16 \[2, 2\] takes 8\)"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0.5, 16.5]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16.0]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2]}, "malformed header entry"),
    ({"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}, "malformed header entry"),
    ("F32", "malformed header entry"),
    ({"dtype": "F4", "shape": [32], "data_offsets": [0, 16]},
     "has dtype 'F4', which is not supported"),
    ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, "truncated"),
])
def test_inconsistent_header_entries(tmp_path: Path, entry: dict, message: str) -> None:
    path = raw_safetensors(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 16)
    with pytest.raises(SafetensorsFileError, match=message) as info:
        read_safetensors_header(path)
    if message != "truncated":
        assert "'w'" in str(info.value)


F32_4 = {"dtype": "F32", "shape": [4]}  # 16 bytes


@pytest.mark.parametrize(("offsets", "data_size", "message"), [
    ({"a": [0, 16], "b": [0, 16]}, 32, "tensors 'a' and 'b' overlap"),
    ({"a": [0, 16], "b": [8, 24]}, 24, "tensors 'a' and 'b' overlap"),
    # `c` moved onto `b`'s bytes: the overlap is named, not the gap it leaves
    ({"a": [0, 16], "b": [32, 48], "c": [32, 48]}, 48, "tensors 'b' and 'c' overlap"),
    ({"a": [0, 16], "b": [32, 48]}, 48, r"bytes 16 to 32 of the data belong to no tensor "
                                        r"\(before 'b'\)"),
    ({"a": [4, 20], "b": [20, 36]}, 36, r"bytes 0 to 4 .* \(before 'a'\)"),
    ({"a": [0, 16], "b": [16, 32]}, 36, "the last 4 bytes of the file belong to no tensor"),
])
def test_tensors_must_cover_the_data_without_gaps_or_overlaps(
        tmp_path: Path, offsets: dict[str, list[int]], data_size: int, message: str) -> None:
    """What the safetensors library refuses is refused here too, before any tensor is read."""
    header = {name: {**F32_4, "data_offsets": o} for name, o in offsets.items()}
    path = raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * data_size)
    with pytest.raises(SafetensorError):
        safe_open(path, "pt")
    with pytest.raises(SafetensorsFileError, match=message):
        read_safetensors_header(path)
    _, problems = Checkpoint.open(tmp_path, "task1")
    assert [p.model for p in problems] == ["task1"]
    assert problems[0].message.startswith("model.safetensors: ")


def test_tensors_in_any_order_and_empty_ones_are_valid(tmp_path: Path) -> None:
    """Data in another order than the header's entries, and 0-byte tensors anywhere."""
    header = {"a": {**F32_4, "data_offsets": [16, 32]}, "b": {**F32_4, "data_offsets": [0, 16]},
              "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [16, 16]},
              "f": {"dtype": "BF16", "shape": [0], "data_offsets": [32, 32]}}
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    path = raw_safetensors(tmp_path / "model.safetensors", header, data)
    with safe_open(path, "pt") as f:
        assert f.get_tensor("a").tolist() == [4, 5, 6, 7]
    ckpt, problems = Checkpoint.open(tmp_path, "base")
    assert problems == [] and ckpt is not None
    assert ckpt.get("a").tolist() == [4, 5, 6, 7] and ckpt.get("b").tolist() == [0, 1, 2, 3]
    assert ckpt.get("e").shape == (0, 3)
    ckpt.close()


def test_metadata_is_not_a_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", "note": "hi"})
    assert list(read_safetensors_header(path)) == ["w"]


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    tensors = synthetic_tensors(1)
    shards = write_sharded(tmp_path, tensors, max_bytes=600)
    assert len(shards) > 2
    ckpt, problems = Checkpoint.open(tmp_path, "task1")
    assert problems == [] and ckpt is not None
    assert set(ckpt.tensors) == set(tensors)
    assert {i.file.name for i in ckpt.tensors.values()} == set(shards)
    for name, value in tensors.items():
        assert torch.equal(ckpt.get(name), value)


def test_an_index_wins_over_a_stray_single_file(tmp_path: Path) -> None:
    tensors = synthetic_tensors(1)
    write_sharded(tmp_path, tensors, max_bytes=600)
    save_file({"other": torch.ones(1)}, tmp_path / "model.safetensors")
    ckpt, problems = Checkpoint.open(tmp_path, "task1")
    assert problems == [] and ckpt is not None and set(ckpt.tensors) == set(tensors)


def test_index_pointing_to_a_missing_shard(tmp_path: Path) -> None:
    shards = write_sharded(tmp_path, synthetic_tensors(1), max_bytes=600)
    (tmp_path / shards[1]).unlink()
    ckpt, problems = Checkpoint.open(tmp_path, "task2")
    assert ckpt is None
    assert [(p.model, p.message) for p in problems] == \
        [("task2", f"shard {shards[1]} listed in the index is missing")]


def test_index_mapping_a_tensor_to_the_wrong_shard(tmp_path: Path) -> None:
    shards = write_sharded(tmp_path, synthetic_tensors(1), max_bytes=600)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index["weight_map"]["ghost.weight"] = shards[0]
    index_path.write_text(json.dumps(index))
    ckpt, problems = Checkpoint.open(tmp_path, "task2")
    assert ckpt is None
    found = {(p.tensor, p.message) for p in problems}
    assert found == {(name, f"index maps it to {shards[1]}, which does not hold it"),
                     ("ghost.weight", f"index maps it to {shards[0]}, which does not hold it")}
    assert all(p.model == "task2" for p in problems)


def _two_shards(directory: Path, index_points_at: int) -> tuple[list[str], str]:
    """Two shards that both hold a tensor (another value in the second); the index maps it
    to shard `index_points_at`."""
    tensors = synthetic_tensors(1)
    names = sorted(tensors)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({n: tensors[n] for n in names[:5]}, directory / shards[0])
    save_file({n: tensors[n] for n in names[5:]} | {names[0]: torch.zeros(3)},
              directory / shards[1])
    index = {"weight_map": {n: shards[i >= 5] for i, n in enumerate(names)}}
    index["weight_map"][names[0]] = shards[index_points_at]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards, names[0]


@pytest.mark.parametrize("index_points_at", [0, 1])
def test_a_tensor_in_two_shards(tmp_path: Path, index_points_at: int) -> None:
    """Which copy a loader takes depends on its reading order: a problem naming both shards,
    wherever the index points (and no false "does not hold it")."""
    shards, name = _two_shards(tmp_path, index_points_at)
    ckpt, problems = Checkpoint.open(tmp_path, "task2")
    assert ckpt is None
    assert [(p.model, p.tensor, p.message) for p in problems] == [
        ("task2", name, f"held by more than one shard: {shards[0]} and {shards[1]}")]


@pytest.mark.parametrize("entry", ["/abs/model.safetensors", "../other/model.safetensors",
                                   "sub/../../model.safetensors", ".."])
def test_index_entries_outside_the_model_directory(tmp_path: Path, entry: str) -> None:
    """Such a file is never opened: one problem per file, however many tensors map to it."""
    model = tmp_path / "model"
    write_sharded(model, synthetic_tensors(1), max_bytes=600)
    write_checkpoint(tmp_path / "other", synthetic_tensors(1))
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], entry)
    index_path.write_text(json.dumps(index))
    ckpt, problems = Checkpoint.open(model, "task2")
    assert ckpt is None
    assert [(p.model, p.message) for p in problems] == [
        ("task2", f"model.safetensors.index.json lists {entry}, which is outside the model "
                  "directory")]


def test_shards_in_a_subdirectory(tmp_path: Path) -> None:
    tensors = synthetic_tensors(1)
    (tmp_path / "weights").mkdir()
    save_file(tensors, tmp_path / "weights" / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: ("./weights/model.safetensors" if i % 2 else "weights/model.safetensors")
        for i, n in enumerate(tensors)}}))
    ckpt, problems = Checkpoint.open(tmp_path, "task1")
    assert problems == [] and ckpt is not None
    assert all(torch.equal(ckpt.get(n), v) for n, v in tensors.items())
    ckpt.close()


def test_problems_of_one_kind_are_capped(tmp_path: Path) -> None:
    """30 tensors the index maps to a shard that does not hold them: the first 20, then a
    count; problems of another kind are listed (and capped) on their own."""
    shards = write_sharded(tmp_path, synthetic_tensors(1), max_bytes=600)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] |= {f"ghost.{i}": shards[0] for i in range(30)}
    index_path.write_text(json.dumps(index))
    _, problems = Checkpoint.open(tmp_path, "task2")
    assert len(problems) == 21
    assert [p.tensor for p in problems[:20]] == [f"ghost.{i}" for i in range(20)]
    assert (problems[20].model, problems[20].message) == ("task2", "... and 10 more problems")

    index["weight_map"] |= {f"n{i}": f"/elsewhere/{i}.safetensors" for i in range(25)}
    index_path.write_text(json.dumps(index))
    _, problems = Checkpoint.open(tmp_path, "task2")
    assert len(problems) == 21 and all("outside the model directory" in p.message
                                       for p in problems[:20])
    assert problems[20].message == "... and 5 more problems"


def test_a_corrupt_shard_is_named(tmp_path: Path) -> None:
    shards = write_sharded(tmp_path, synthetic_tensors(1), max_bytes=600)
    data = (tmp_path / shards[-1]).read_bytes()
    (tmp_path / shards[-1]).write_bytes(data[: len(data) - 4])
    _, problems = Checkpoint.open(tmp_path, "task2")
    assert len(problems) == 1 and problems[0].message.startswith(f"{shards[-1]}: truncated")


@pytest.mark.parametrize("text", ["not json", "[]", '{"metadata": {}}', '{"weight_map": 3}'])
def test_invalid_index(tmp_path: Path, text: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(text)
    ckpt, problems = Checkpoint.open(tmp_path, "base")
    assert ckpt is None
    assert [p.model for p in problems] == ["base"]
    assert "is not a valid index" in problems[0].message


def test_bin_only_directory_says_safetensors_are_needed(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    ckpt, problems = Checkpoint.open(tmp_path, "task1")
    assert ckpt is None
    [problem] = problems
    assert problem.model == "task1"
    assert "no model.safetensors or model.safetensors.index.json" in problem.message
    assert "pytorch_model.bin" in problem.message
    assert "only safetensors weights are supported" in problem.message


def test_empty_directory(tmp_path: Path) -> None:
    ckpt, problems = Checkpoint.open(tmp_path, "task1")
    assert ckpt is None
    assert "no model.safetensors" in problems[0].message
    assert "supported" not in problems[0].message


def test_transformers_sharded_save_is_read(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ckpt, problems = Checkpoint.open(tmp_path, "task1")
    assert problems == [] and ckpt is not None
    state = model.state_dict()
    assert set(ckpt.tensors) <= set(state)
    for name in ckpt.tensors:
        assert torch.equal(ckpt.get(name), state[name])
