"""Full checkpoints on disk: a single `model.safetensors` or shards with an index.

Only headers are read up front; tensors are read one at a time when asked for, with `preadv`
straight into a fresh tensor. No file is memory-mapped: mapped pages that were touched count
in the process's RSS (12 GB for five 1B-parameter models), page-cache reads do not.

The engine reads the next tensor ahead while it merges the current one: `read_ahead` reads it
in another thread (`preadv` releases the GIL; the kernel's copy out of the page cache is a
third of a streamed merge's CPU time), `prefetch` only asks the kernel to start reading.
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_service.errors import Problem, capped

# every dtype of the safetensors format that has a torch dtype of the same element size (not
# the sub-byte F4, F6_E2M3, F6_E3M2)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class SafetensorsFileError(Exception):
    """A safetensors file that cannot be read; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # where the tensor's bytes start in the file

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header as the `safetensors` library does: known dtypes,
    non-negative integer shapes and offsets, each tensor's byte length its shape's, and the
    tensors laid out one after another over the whole data section (no gap, no overlap).

    Catches truncated or corrupt files before any tensor is read.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFileError("file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise SafetensorsFileError("header length is beyond the end of the file")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise SafetensorsFileError(f"cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetensorsFileError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsFileError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            shape = tuple(_count(d) for d in entry["shape"])
            begin, end = (_count(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFileError(f"tensor {name!r} has a malformed header entry") from None
        if dtype is None:
            raise SafetensorsFileError(f"tensor {name!r} has dtype {entry['dtype']!r}, which is "
                                       "not supported")
        info = TensorInfo(path, dtype, shape, 8 + length + begin)
        if end - begin != info.nbytes:
            raise SafetensorsFileError(
                f"tensor {name!r}: data size does not match its shape ({end - begin} bytes; "
                f"{entry['dtype']} {list(shape)} takes {info.nbytes})")
        spans.append((begin, end, name))
        infos[name] = info
    needed = max((end for _, end, _ in spans), default=0)
    if needed > data_size:
        raise SafetensorsFileError(
            f"truncated: tensors need {needed} bytes of data, the file has {data_size}")
    covered, previous = 0, ""  # the data is covered up to byte `covered`, by `previous`
    gap = None  # reported after any overlap, which is what usually leaves a gap elsewhere
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise SafetensorsFileError(f"tensors {previous!r} and {name!r} overlap")
        if begin > covered and gap is None:
            gap = f"bytes {covered} to {begin} of the data belong to no tensor (before {name!r})"
        covered, previous = end, name
    if gap is not None:
        raise SafetensorsFileError(gap)
    if covered < data_size:
        raise SafetensorsFileError(f"the last {data_size - covered} bytes of the file belong "
                                   "to no tensor")
    return infos


def _count(value: object) -> int:
    """A shape dimension or an offset: a JSON integer, not negative (not 2.5, "2" or true)."""
    if type(value) is not int or value < 0:
        raise ValueError(value)
    return value


def _outside(shard: str) -> bool:
    """Whether an index entry names a file outside the model directory: an absolute path, or
    one whose `..` climb out of it. Judged on the name, not on the resolved file: the shards
    of a Hub snapshot are symlinks into the cache's blob store."""
    return os.path.isabs(shard) or os.path.normpath(shard).split(os.sep)[0] == ".."


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes from an open safetensors file into a new CPU tensor."""
    out = torch.empty(info.shape, dtype=info.dtype)
    view = out.reshape(-1).view(torch.uint8).numpy().data
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], info.offset + done)
        if got == 0:
            raise OSError(f"{info.file.name}: unexpected end of file")
        done += got
    return out


class Checkpoint:
    """A model directory with safetensors weights, read lazily."""

    def __init__(self, directory: Path, tensors: dict[str, TensorInfo]) -> None:
        self.directory = directory
        self.tensors = tensors
        self._handles: dict[Path, int] = {}  # open file descriptors
        self._ahead: dict[str, Future[torch.Tensor]] = {}  # tensors being read ahead

    @classmethod
    def open(cls, directory: Path, label: str, prefix: str = "model"
             ) -> tuple[Checkpoint | None, list[Problem]]:
        """Read every header of the checkpoint; return it, or the problems that prevent it
        (of each kind the first 20)."""
        index = directory / f"{prefix}.safetensors.index.json"
        single = directory / f"{prefix}.safetensors"
        files: list[Path]
        outside: list[Problem] = []
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                listed = sorted(set(weight_map.values()))
                files = sorted({directory / f for f in listed if not _outside(f)})
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None, [Problem(f"{index.name} is not a valid index "
                                      "(expected a 'weight_map' object)", model=label)]
            outside = [Problem(f"{index.name} lists {f}, which is outside the model directory",
                               model=label) for f in listed if _outside(f)]
        elif single.is_file():
            weight_map, files = None, [single]
        else:
            others = sorted(p.name for p in directory.glob("*") if p.suffix in {".bin", ".pt"})
            hint = f" (found {', '.join(others)}: only safetensors weights are supported)" \
                if others else ""
            return None, [Problem(f"no {single.name} or {index.name} in {directory}{hint}",
                                  model=label)]
        tensors: dict[str, TensorInfo] = {}
        holders: dict[str, list[Path]] = defaultdict(list)  # the shards that hold each tensor
        unreadable: list[Problem] = []
        for file in files:
            if not file.is_file():
                unreadable.append(Problem(f"shard {file.name} listed in the index is missing",
                                          model=label))
                continue
            try:
                header = read_safetensors_header(file)
            except SafetensorsFileError as exc:
                unreadable.append(Problem(f"{file.name}: {exc}", model=label))
                continue
            tensors.update(header)
            for name in header:
                holders[name].append(file)
        # a loader that reads every shard keeps whichever copy it happens to read last
        twice = [Problem(f"held by more than one shard: {' and '.join(f.name for f in held)}",
                         model=label, tensor=name)
                 for name, held in sorted(holders.items()) if len(held) > 1]
        misplaced: list[Problem] = []
        if weight_map is not None and not (outside or unreadable):
            misplaced = [Problem(f"index maps it to {fname}, which does not hold it",
                                 model=label, tensor=name)
                         for name, fname in weight_map.items()
                         if directory / fname not in holders.get(name, [])]
        problems = [*capped(outside, label), *capped(unreadable, label),
                    *capped(twice, label), *capped(misplaced, label)]
        if problems:
            return None, problems
        return cls(directory, tensors), []

    def _fd(self, file: Path) -> int:
        fd = self._handles.get(file)
        if fd is None:
            fd = self._handles[file] = os.open(file, os.O_RDONLY)
        return fd

    def get(self, name: str) -> torch.Tensor:
        ahead = self._ahead.pop(name, None)
        if ahead is not None:
            return ahead.result()
        info = self.tensors[name]
        return read_tensor(self._fd(info.file), info)

    def read_ahead(self, name: str, executor: Executor) -> None:
        """Start reading a tensor in `executor`; the next `get` of it returns that read."""
        info = self.tensors[name]
        if name not in self._ahead:
            self._ahead[name] = executor.submit(read_tensor, self._fd(info.file), info)

    def nbytes_of(self, name: str) -> int:
        info = self.tensors.get(name)
        return 0 if info is None else info.nbytes

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes into the page cache and return at
        once (`POSIX_FADV_WILLNEED`), so the read overlaps the work on the tensor before it.
        Page-cache pages are not this process's memory; a no-op where the call is missing."""
        size = self.nbytes_of(name)
        if size == 0 or not hasattr(os, "posix_fadvise"):  # length 0 would mean "to the end"
            return
        info = self.tensors[name]
        os.posix_fadvise(self._fd(info.file), info.offset, size, os.POSIX_FADV_WILLNEED)

    def floating_dtype(self) -> torch.dtype:
        """The dtype of most floating-point parameters (the model's dtype)."""
        counts: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.is_float:
                counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def close(self) -> None:
        for ahead in self._ahead.values():  # a read in flight uses a descriptor closed below
            if not ahead.cancel():
                ahead.exception()
        self._ahead.clear()
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
