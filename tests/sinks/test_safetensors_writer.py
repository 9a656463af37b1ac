"""ShardedSafetensorsWriter: files that `safetensors` itself reads back, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_service.sinks.safetensors_writer import ShardedSafetensorsWriter
from merge_service.sources.checkpoint import read_safetensors_header
from tests.conftest import read_tensors


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=gen)
    return {
        "f64": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "f32": floats,
        "f16": floats.half(),
        "bf16": floats.bfloat16(),
        "i64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.tensor([-(2**15), 0, 2**15 - 1], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8_e4m3": floats.to(torch.float8_e4m3fn),
        "f8_e5m2": floats.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "empty_int": torch.zeros(0, dtype=torch.int64),
        "noncontiguous": floats.t(),
        "three_d": torch.randn(2, 3, 4, generator=gen),
    }


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    # compare bytes: NaN-safe and exact for every dtype (float8 included)
    assert torch.equal(actual.contiguous().view(torch.uint8) if actual.dim() else
                       actual.reshape(1).view(torch.uint8),
                       expected.contiguous().view(torch.uint8) if expected.dim() else
                       expected.reshape(1).view(torch.uint8)), name


@pytest.mark.parametrize("announced", ["all", "none", "half"])
def test_single_file_round_trips_every_dtype(tmp_path: Path, announced: str) -> None:
    tensors = sample_tensors()
    expected = {"all": list(tensors), "none": [], "half": list(tensors)[::2]}[announced]
    writer = ShardedSafetensorsWriter(tmp_path, "model", shard_bytes=10**9,
                                      metadata={"merged_by": "test"}, expected=expected)
    for name, value in tensors.items():
        writer.add(name, value)
    assert writer.finish() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt", "merged_by": "test"}
        for name, value in tensors.items():
            assert_identical(f.get_tensor(name), value, name)
    assert writer.total_bytes == sum(v.numel() * v.element_size() for v in tensors.values())
    # our own header reader agrees, and so does the alignment rule (data 8-byte aligned)
    header = read_safetensors_header(tmp_path / "model.safetensors")
    assert {n: (i.dtype, i.shape) for n, i in header.items()} == \
        {n: (v.dtype, tuple(v.shape)) for n, v in tensors.items()}
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_shards_split_at_the_limit_with_an_index(tmp_path: Path) -> None:
    tensors = {f"layers.{i}.weight": torch.full((10, 10), float(i)) for i in range(7)}  # 400 B
    tensors["layers.7.bias"] = torch.zeros(0)
    writer = ShardedSafetensorsWriter(tmp_path, "model", shard_bytes=1000)
    for name, value in tensors.items():
        writer.add(name, value)
    names = writer.finish()
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert names == [*shards, "model.safetensors.index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 7 * 400
    assert set(index["weight_map"]) == set(tensors)
    for shard in shards:
        size = sum(v.numel() * 4 for n, v in tensors.items() if index["weight_map"][n] == shard)
        assert 0 < size <= 1000
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert {n for n, s in index["weight_map"].items() if s == shard} == set(f.keys())
    # tensors keep their order: shard i holds consecutive tensors
    assert [index["weight_map"][n] for n in tensors] == sorted(index["weight_map"][n]
                                                               for n in tensors)
    for name, value in read_tensors(tmp_path).items():
        assert_identical(value, tensors[name], name)


def test_a_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, "model", shard_bytes=100)
    writer.add("small", torch.ones(4))
    writer.add("big", torch.ones(1000))
    writer.add("small2", torch.ones(4))
    names = writer.finish()
    index = json.loads((tmp_path / names[-1]).read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert torch.equal(read_tensors(tmp_path)["big"], torch.ones(1000))


def test_no_tensors_still_writes_a_valid_file(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, "model")
    assert writer.finish() == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert list(f.keys()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_another_prefix(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, "compressed", shard_bytes=10)
    writer.add("a::0::u", torch.ones(3))
    writer.add("a::0::s", torch.ones(3))
    assert writer.finish() == ["compressed-00001-of-00002.safetensors",
                               "compressed-00002-of-00002.safetensors",
                               "compressed.safetensors.index.json"]


def test_cuda_or_grad_tensors_are_detached(tmp_path: Path) -> None:
    value = torch.randn(3, 3, requires_grad=True)
    writer = ShardedSafetensorsWriter(tmp_path, "model")
    writer.add("w", value * 2)
    writer.finish()
    assert torch.equal(read_tensors(tmp_path)["w"], (value * 2).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loads_with_safetensors_torch_load_file(tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    value = torch.linspace(-3, 3, 24).reshape(4, 6).to(dtype)
    writer = ShardedSafetensorsWriter(tmp_path, "model")
    writer.add("x", value)
    writer.finish()
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["x"].dtype == dtype
    assert torch.equal(loaded["x"], value)


def test_announced_names_are_written_in_place(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name announced: each shard's data goes straight behind its reserved header, which
    is padded with spaces; nothing is copied."""
    def no_copy(*_args: object) -> int:
        raise AssertionError("the data was copied")

    monkeypatch.setattr("os.copy_file_range", no_copy)
    monkeypatch.setattr("shutil.copyfileobj", no_copy)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.full((5, 20), float(i),
                                                                    dtype=torch.float64)
               for i in range(5)}  # 800 B each
    writer = ShardedSafetensorsWriter(tmp_path, "model", shard_bytes=1600, expected=tensors)
    for name, value in tensors.items():
        writer.add(name, value)
    names = writer.finish()
    assert len(names) == 4  # three shards and the index
    for shard in names[:-1]:
        raw = (tmp_path / shard).read_bytes()
        size = int.from_bytes(raw[:8], "little")
        assert size % 8 == 0
        assert raw[8:8 + size].endswith(b" ") and raw[8:8 + size].rstrip().endswith(b"}")
        header = json.loads(raw[8:8 + size])
        assert len(raw) == 8 + size + max(e["data_offsets"][1] for n, e in header.items()
                                          if n != "__metadata__")
    for name, value in read_tensors(tmp_path).items():
        assert_identical(value, tensors[name], name)


def test_a_header_that_outgrows_its_space_moves_the_data(tmp_path: Path) -> None:
    """Names nobody announced: the header is larger than the space reserved for the announced
    ones, and the shard is still exact."""
    tensors = {f"{'x' * 300}.{i}": torch.arange(i * 10, dtype=torch.int32) for i in range(6)}
    writer = ShardedSafetensorsWriter(tmp_path, "model", expected=list(tensors)[:1])
    for name, value in tensors.items():
        writer.add(name, value)
    assert writer.finish() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name, value in tensors.items():
            assert_identical(f.get_tensor(name), value, name)
