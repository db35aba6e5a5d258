"""Lazy, memory-mapped access to checkpoint tensors, one at a time.

safetensors files are parsed directly (an 8-byte header length, a JSON header, then raw data)
and memory-mapped with NumPy, so bf16 needs no torch and a tensor costs memory only while it is
being converted. Sharded checkpoints are followed through their ``*.index.json``. PyTorch
``.bin`` files are read only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava_gguf.errors import CheckpointError

# safetensors dtype -> (numpy storage dtype, bytes per element)
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # stored as uint16, widened to f32 on read
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its file, dtype, shape and byte range."""

    name: str
    path: Path
    dtype: str  # safetensors dtype name ("F32", "F16", "BF16", ...), also for .bin tensors
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32: the high half of an f32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One ``.safetensors`` file's header, checked against the file's size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _HEADER_LIMIT):
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header; re-download it")
            try:
                header: dict[str, Any] = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download it") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        self.refs: dict[str, TensorRef] = {}
        for name, info in header.items():
            dtype = info.get("dtype")
            if dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            if data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                    f"but the file has {size} bytes; re-download it"
                )
            if end - begin != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize:
                raise CheckpointError(f"{path}: tensor {name!r} size does not match its shape {shape}")
            self.refs[name] = TensorRef(name, path, dtype, shape, data_start + begin, end - begin)


class TensorStore:
    """All tensors of a checkpoint directory (or of several: a LLaVA 1.5 model plus its CLIP repo)."""

    def __init__(self) -> None:
        self._refs: dict[str, TensorRef] = {}
        self._torch_files: dict[Path, dict[str, Any]] = {}

    @classmethod
    def open(cls, directory: Path) -> TensorStore:
        store = cls()
        store.add_directory(directory)
        return store

    def add_directory(self, directory: Path) -> None:
        for path in _weight_files(directory):
            if path.suffix == ".safetensors":
                for name, ref in SafetensorsFile(path).refs.items():
                    self._refs[name] = ref
            else:
                for name, ref in self._open_torch(path).items():
                    self._refs[name] = ref

    def names(self) -> list[str]:
        return list(self._refs)

    def ref(self, name: str) -> TensorRef:
        return self._refs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._refs

    def load(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array: f32 and f16 as stored (a memory-mapped view), bf16 as f32."""
        array = self.load_raw(name)
        return bf16_to_f32(array) if self._refs[name].dtype == "BF16" else array

    def load_raw(self, name: str) -> np.ndarray:
        """The tensor as stored, memory-mapped (bf16 as its uint16 bits)."""
        ref = self._refs[name]
        if ref.path.suffix != ".safetensors":
            return self._load_torch(ref)
        dtype = _DTYPES[ref.dtype]
        count = ref.nbytes // dtype.itemsize
        data = np.memmap(ref.path, dtype=dtype, mode="r", offset=ref.start, shape=(count,))
        return data.reshape(ref.shape)  # [count] -> shape

    def iter_refs(self) -> Iterator[TensorRef]:
        return iter(self._refs.values())

    # PyTorch .bin checkpoints (older LLaVA uploads)
    def _open_torch(self, path: Path) -> dict[str, TensorRef]:
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path}: PyTorch .bin weights need torch to read (pip install torch), "
                "or use a checkpoint with .safetensors files"
            ) from e
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt pickles
            raise CheckpointError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e
        self._torch_files[path] = state
        _TORCH_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
        return {
            name: TensorRef(name, path, _TORCH_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape), 0,
                            t.numel() * t.element_size())
            for name, t in state.items()
        }

    def _load_torch(self, ref: TensorRef) -> np.ndarray:
        import torch

        t = self._torch_files[ref.path][ref.name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)  # the bits, as safetensors gives them
        return t.numpy()


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a directory, through a sharded index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{directory}: missing shard(s) {', '.join(missing)} named in {index_name}; "
                    "download the complete checkpoint"
                )
            return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in directory.glob("*.bin") if p.name.startswith("pytorch_model"))
    return files
