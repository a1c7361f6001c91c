"""Lazy reading and streamed writing of safetensors checkpoints (one tensor at a time, nothing memory-mapped).

`Checkpoint` indexes a model directory (`model.safetensors`, or shards listed by `model.safetensors.index.json`)
from the files' JSON headers and reads single tensors with positioned reads into fresh buffers, so the process only
ever holds the tensors it asked for (a memory map would leave every touched page resident).

`ShardWriter` writes a checkpoint whose tensor names, dtypes and shapes are known up front: each shard's header is
computed before any data, then tensors are streamed to disk as they are produced, in plan order. Peak memory is
the tensor being written, not the shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..core.errors import DeltatuneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise DeltatuneError(f"{path}: not a readable safetensors file ({err})") from None
    return header, 8 + size


class Checkpoint:
    """The tensors of a model directory, read one at a time."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.entries: dict[str, TensorEntry] = {}
        for file in _shard_files(self.directory):
            header, data_start = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta.get("dtype") not in DTYPES:
                    raise DeltatuneError(f"{file}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
                begin, end = meta["data_offsets"]
                self.entries[name] = TensorEntry(file, DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                                 data_start + begin, data_start + end)
        if not self.entries:
            raise DeltatuneError(f"{self.directory}: the checkpoint holds no tensors")

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise DeltatuneError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        out = torch.empty(entry.shape, dtype=entry.dtype)
        size = entry.end - entry.start
        if size != out.numel() * out.element_size():
            raise DeltatuneError(f"{entry.file}: tensor {name!r} has {size} bytes for shape {entry.shape}")
        if size:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(entry.file, "rb") as f:
                f.seek(entry.start)
                if f.readinto(view) != size:
                    raise DeltatuneError(f"{entry.file}: truncated while reading {name!r}; the file is damaged")
        return out


def _shard_files(directory: Path) -> list[Path]:
    if directory.is_file() and directory.suffix == ".safetensors":
        return [directory]
    if not directory.is_dir():
        raise DeltatuneError(f"model directory {str(directory)!r} does not exist")
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise DeltatuneError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DeltatuneError(f"{index} lists shard(s) that do not exist: {', '.join(missing[:3])}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (it has {pickled[0]}: deltatune never unpickles; convert it to safetensors)" if pickled else ""
        raise DeltatuneError(f"{directory}: no safetensors weights found{hint}")
    return files


class ShardWriter:
    """Streams a planned list of tensors into safetensors shards of at most `max_shard_bytes` each."""

    def __init__(self, directory: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 2 << 30, metadata: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = _split(plan, max_shard_bytes)
        count = len(self.shards)
        self.files = [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                        for i in range(count)]
        self.where = {name: i for i, shard in enumerate(self.shards) for name, _, _ in shard}
        self.order = [name for shard in self.shards for name, _, _ in shard]
        self.expected = {name: (dtype, shape) for name, dtype, shape in plan}
        self.position = 0
        self.handle = None
        self.open_shard = -1

    def write(self, name: str, tensor: Tensor) -> None:
        """Write the next tensor of the plan (tensors must come in plan order)."""
        if self.position >= len(self.order) or self.order[self.position] != name:
            raise RuntimeError(f"ShardWriter: expected {self.order[self.position]!r}, got {name!r}")
        dtype, shape = self.expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"ShardWriter: {name!r} is {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
        shard = self.where[name]
        if shard != self.open_shard:
            self._start_shard(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        self.position += 1

    def _start_shard(self, index: int) -> None:
        self._close_handle()
        header, offset = {"__metadata__": self.metadata}, 0
        for name, dtype, shape in self.shards[index]:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.handle = open(self.directory / self.files[index], "wb")  # noqa: SIM115 - kept open across writes
        self.handle.write(struct.pack("<Q", len(blob)) + blob)
        self.open_shard = index

    def _close_handle(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None

    def close(self) -> None:
        """Finish the last shard and write the index (for several shards). Every planned tensor must be written."""
        if self.position != len(self.order):
            raise RuntimeError(f"ShardWriter: {len(self.order) - self.position} planned tensors were never written")
        self._close_handle()
        if len(self.files) > 1:
            total = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in self.expected.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: self.files[i] for name, i in sorted(self.where.items())}}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _split(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = math.prod(item[2]) * torch.empty((), dtype=item[1]).element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards
