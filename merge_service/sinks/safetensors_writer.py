"""Write tensors to sharded safetensors files as they are produced, one tensor in memory.

Each tensor's bytes are appended to a data file as soon as it is merged. When a shard is
complete its header (names, dtypes, shapes, offsets) is written to the final file and the
data is appended behind it with `os.copy_file_range` (an in-kernel copy: no user-space buffer).
The shard layout follows `transformers`: `model.safetensors` for one shard, else
`model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from merge_service.sources.checkpoint import DTYPE_NAMES


class ShardedSafetensorsWriter:
    def __init__(self, directory: Path, prefix: str = "model", shard_bytes: int = 5 * 10**9,
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards: list[tuple[Path, dict[str, dict]]] = []  # (data file, header)
        self._data: Path | None = None
        self._fh = None
        self._header: dict[str, dict] = {}
        self._offset = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.reshape(-1).stride(0) != 1:
            # "contiguous" ignores the strides of size-1 dims; the byte view below does not
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        nbytes = tensor.numel() * tensor.element_size()
        if self._fh is not None and self._offset and self._offset + nbytes > self.shard_bytes:
            self._close_shard()
        if self._fh is None:
            self._data = self.directory / f".{self.prefix}-{len(self._shards) + 1}.data"
            self._fh = self._data.open("wb")
            self._header, self._offset = {}, 0
        if nbytes:
            self._fh.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total_bytes += nbytes

    def _close_shard(self) -> None:
        assert self._fh is not None and self._data is not None
        self._fh.close()
        self._shards.append((self._data, self._header))
        self._fh, self._data = None, None

    def finish(self) -> list[str]:
        """Write the final shard files (and the index when sharded); return their names."""
        if self._fh is not None:
            self._close_shard()
        if not self._shards:  # a model with no tensors still gets a valid (empty) file
            empty = self.directory / f".{self.prefix}-empty.data"
            empty.touch()
            self._shards.append((empty, {}))
        n = len(self._shards)
        names = [f"{self.prefix}.safetensors"] if n == 1 else \
            [f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map: dict[str, str] = {}
        for (data, header), fname in zip(self._shards, names, strict=True):
            _assemble(self.directory / fname, data, {"__metadata__": self.metadata, **header})
            data.unlink()
            weight_map.update(dict.fromkeys(header, fname))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")
            names.append(f"{self.prefix}.safetensors.index.json")
        return names


def _assemble(target: Path, data: Path, header: dict) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes
    with target.open("wb") as out, data.open("rb") as src:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        out.flush()
        remaining = data.stat().st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(src.fileno(), out.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        except OSError:  # filesystems without copy_file_range
            shutil.copyfileobj(src, out, 16 * 2**20)
            remaining = 0
        if remaining:
            raise OSError(f"short copy while writing {target.name}")
