"""Full checkpoints: safetensors headers, truncation, shard indexes, unsupported formats."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_service.sources.checkpoint import (
    Checkpoint,
    SafetensorsFileError,
    read_safetensors_header,
)
from tests.conftest import synthetic_tensors, write_checkpoint, write_sharded

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2]


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
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}, "does not match its shape"),
    ({"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [2, 2]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, "truncated"),
])
def test_inconsistent_header_entries(tmp_path: Path, entry: dict, message: str) -> None:
    path = raw_safetensors(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 16)
    with pytest.raises(SafetensorsFileError, match=message) as info:
        read_safetensors_header(path)
    if message != "truncated":
        assert "'w'" in str(info.value)


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
