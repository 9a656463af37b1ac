"""Write tensors to sharded safetensors files as they are produced, one tensor in memory.

A shard's data goes straight into its final file, behind space reserved for the header: the
caller announces the names it will add (`expected`), and each shard reserves what the header
entries of the names still to come can take. When the shard closes its header (names,
dtypes, shapes, offsets) is written into that space, padded with spaces (the safetensors
format allows trailing whitespace in the header). A header that outgrows its space, from
names nobody announced, moves the data once, behind the header, with `os.copy_file_range`
(an in-kernel copy). The layout follows `transformers`: `model.safetensors` for one shard,
else `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

from merge_service.sources.checkpoint import DTYPE_NAMES

# a header entry beyond its quoted name: `:{"dtype":"BF16","shape":[…],"data_offsets":[…]},`
# with up to four 20-digit dimensions and two 20-digit offsets
_ENTRY_BYTES = 48 + 4 * 21 + 2 * 21


def _entry_bound(name: str) -> int:
    return len(json.dumps(name)) + _ENTRY_BYTES


class ShardedSafetensorsWriter:
    def __init__(self, directory: Path, prefix: str = "model", shard_bytes: int = 5 * 10**9,
                 metadata: dict[str, str] | None = None, expected: Iterable[str] = ()) -> None:
        self.directory = directory
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending = {name: _entry_bound(name) for name in expected}
        self._pending_bytes = sum(self._pending.values())
        self._shards: list[tuple[Path, int, dict[str, dict]]] = []  # (file, reserved, header)
        self._path: Path | None = None
        self._fh: BinaryIO | None = None
        self._reserved = 0
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
        fh = self._fh if self._fh is not None else self._open_shard()
        if nbytes:
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total_bytes += nbytes
        self._pending_bytes -= self._pending.pop(name, 0)

    def _open_shard(self) -> BinaryIO:
        header_bound = len(json.dumps({"__metadata__": self.metadata})) + self._pending_bytes
        self._reserved = 8 + header_bound + (-header_bound % 8)  # data starts 8-byte aligned
        self._path = self.directory / f".{self.prefix}-{len(self._shards) + 1}.part"
        self._fh = fh = self._path.open("wb")
        fh.seek(self._reserved)
        self._header, self._offset = {}, 0
        return fh

    def _close_shard(self) -> None:
        assert self._fh is not None and self._path is not None
        self._fh.close()
        self._shards.append((self._path, self._reserved, self._header))
        self._fh, self._path = None, None

    def finish(self) -> list[str]:
        """Write the headers, name the shard files (and write the index when sharded);
        return the file names."""
        if self._fh is None and not self._shards:  # no tensors: still a valid (empty) file
            self._open_shard()
        if self._fh is not None:
            self._close_shard()
        n = len(self._shards)
        names = [f"{self.prefix}.safetensors"] if n == 1 else \
            [f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map: dict[str, str] = {}
        for (part, reserved, header), fname in zip(self._shards, names, strict=True):
            _write_header(part, reserved, {"__metadata__": self.metadata, **header})
            part.rename(self.directory / fname)
            weight_map.update(dict.fromkeys(header, fname))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")
            names.append(f"{self.prefix}.safetensors.index.json")
        return names


def _write_header(part: Path, reserved: int, header: dict) -> None:
    """Put the header in front of the data that starts at byte `reserved` of `part`."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if 8 + len(encoded) <= reserved:
        encoded += b" " * (reserved - 8 - len(encoded))
        with part.open("r+b") as fh:
            fh.write(struct.pack("<Q", len(encoded)) + encoded)
        return
    encoded += b" " * (-len(encoded) % 8)
    moved = part.with_suffix(".moved")
    with moved.open("wb") as out, part.open("rb") as src:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        out.flush()
        _copy_from(src, out, reserved, os.fstat(src.fileno()).st_size - reserved)
    moved.replace(part)


def _copy_from(src, out, offset: int, count: int) -> None:
    """Append bytes `offset … offset + count` of `src` to `out`."""
    while count > 0:
        try:
            copied = os.copy_file_range(src.fileno(), out.fileno(), count, offset)
        except OSError:  # filesystems without copy_file_range
            src.seek(offset)
            shutil.copyfileobj(src, out, 16 * 2**20)
            return
        if copied == 0:
            raise OSError(f"short copy while writing {out.name}")
        offset += copied
        count -= copied
