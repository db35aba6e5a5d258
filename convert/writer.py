"""Streaming GGUF writing: tensor infos first, then each tensor produced and written one at a
time, so peak memory stays near the largest tensor. Outputs land atomically."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.errors import ConversionError
from llava_gguf.partial import atomic_file, open_partial, sweep

log = logging.getLogger(__name__)

# Called after each tensor: (tensor name, bytes written so far, total bytes)
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its GGUF name, logical shape (NumPy order), type, and a producer."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape, dtype=np.int64))


def encode_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``data`` (float) in the storage form of ``qtype``: f32/f16 arrays, raw bytes otherwise."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    if qtype == gguf.GGMLQuantizationType.BF16 and data.dtype == np.uint16:
        return np.ascontiguousarray(data).view(np.uint8)  # already bf16 bits
    return np.ascontiguousarray(gguf.quants.quantize(np.asarray(data, dtype=np.float32), qtype))


def write_gguf(
    writer: gguf.GGUFWriter, tensors: list[PlannedTensor], progress: ProgressCallback | None = None
) -> None:
    """Write the writer's metadata and ``tensors`` to its file, one tensor in memory at a time."""
    for t in tensors:
        if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(t.name, t.shape, dtype, t.nbytes)
        else:
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    total = sum(t.nbytes for t in tensors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    done = 0
    for t in tensors:
        data = encode_tensor(t.produce(), t.qtype)
        if data.nbytes != t.nbytes:
            raise ConversionError(f"tensor {t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
        writer.write_tensor_data(data)
        done += t.nbytes
        if progress is not None:
            progress(t.name, done, total)
    writer.close()


def check_writable(directory: Path) -> None:
    """Fail early, before any work, when ``directory`` cannot hold the outputs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create output directory {directory}: {e.strerror}; choose another --out") from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConversionError(f"output directory {directory} is not writable; choose another --out")


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a partial file's path beside ``final``; rename it to ``final`` only if the block succeeds.
    The partial file is locked meanwhile, so a later run sweeps it only if this one dies."""
    try:
        with atomic_file(final) as partial:
            yield partial.path
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConversionError(f"no space left on the device while writing {final}; free some space") from e
        if isinstance(e, PermissionError):
            raise ConversionError(f"cannot write {final}: permission denied; choose another --out") from e
        raise


@contextlib.contextmanager
def scratch_file(directory: Path, name: str) -> Iterator[Path]:
    """A locked partial file in ``directory``, removed when the block ends, however it ends."""
    with open_partial(directory / name) as partial:
        yield partial.path


def sweep_output(directory: Path) -> None:
    """Remove what conversions that died in ``directory`` left there (their partial files)."""
    removed = sweep(directory)
    if removed.files:
        log.info("removed %d partial files (%d bytes) of interrupted writes in %s", removed.files, removed.bytes,
                 directory)
