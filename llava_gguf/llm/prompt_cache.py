"""KV states of prompt prefixes on disk, so a new question about an image skips the image's prefill.

An entry is llama.cpp's sequence state (``llama_state_seq_get_data``) of a prompt's prefix up to and
including one of its images, keyed by what its positions hold: the LLM file (path, size, mtime), the
settings that change the state (KV cache type, flash attention, batch size, GPU offload), the
llama.cpp library, and the exact item sequence: token ids, and each image's content key (the feature
cache's: pixels, size, vision settings, mmproj), never a placeholder id. So two different images of
the same token count never share an entry.

A file is ``MAGIC``, a little-endian u32 header length, a JSON header (format, key, positions,
items, state size), the state and its CRC-32 (u32). llama.cpp writes the state straight into the
memory-mapped file and reads it back from one, so no copy of the KV cache is held in memory. It is
written to a locked partial file and renamed (``llava_gguf.partial``; the first save of a run removes
the partial files of runs that died); a truncated, corrupt or foreign file is removed with one
warning and never given to llama.cpp. The directory is bounded in size, least recently used entries
out first. Nothing here prints; problems that cost only the cache are logged as warnings and caching
stops for the session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.disk_cache import evict_lru
from llava_gguf.llm.sequence import ImageSlot, Item
from llava_gguf.partial import atomic_file, sweep_once

log = logging.getLogger(__name__)

MAGIC = b"LLGGKV\x00\x01"
FORMAT = 1
SUFFIX = ".kv"
DEFAULT_MAX_BYTES = 4 << 30


@dataclass(frozen=True)
class CachedPrefix:
    """A saved prefix of the items being looked up: how many items and positions it covers."""

    n_items: int
    n_positions: int
    state: memoryview  # a writable (copy-on-write) mapping of the file: llama.cpp reads it in place


def prefix_keys(context_key: str, items: Sequence[Item]) -> list[tuple[int, str]]:
    """(n_items, key) of every prefix of ``items`` that ends with an image, shortest first."""
    digest = hashlib.sha256(f"llava-gguf prompt v{FORMAT}\0{context_key}".encode())
    out = []
    for i, item in enumerate(items):
        if isinstance(item, ImageSlot):
            digest.update(f"\0i{item.key}:{item.n_tokens}".encode())
            out.append((i + 1, digest.copy().hexdigest()[:40]))
        else:
            digest.update(f"\0t{item}".encode())
    return out


class PromptCache:
    """Saved prefix states under ``directory`` for one LLM and context setup (``context_key``)."""

    def __init__(self, directory: Path, context_key: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.context_key = context_key
        self.max_bytes = max_bytes
        self.writable = True
        self.hits = 0
        self.saved = 0

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def find(self, items: Sequence[Item], *, longer_than: int = 0, shorter_than: int | None = None) -> CachedPrefix | None:
        """The longest saved prefix of ``items`` with more than ``longer_than`` and fewer than
        ``shorter_than`` items (default: all but the last; the last position's logits are needed)."""
        limit = len(items) if shorter_than is None else shorter_than
        for n_items, key in reversed(prefix_keys(self.context_key, items)):
            if n_items <= longer_than:
                break
            if n_items >= limit:
                continue
            path = self._path(key)
            if not path.is_file():
                continue
            loaded = self._read(path, key)
            if loaded is not None:
                n_positions, state = loaded
                self.hits += 1
                return CachedPrefix(n_items, n_positions, state)
        return None

    def key_of(self, items: Sequence[Item]) -> str | None:
        """The key of ``items`` when it ends with an image, else None."""
        keys = prefix_keys(self.context_key, items)
        return keys[-1][1] if keys and keys[-1][0] == len(items) else None

    def has(self, items: Sequence[Item]) -> bool:
        key = self.key_of(items)
        return key is not None and self._path(key).is_file()

    def save(self, items: Sequence[Item], n_positions: int, size: int, fill: Callable[[memoryview], int]) -> None:
        """Keep the state of ``items`` (a prefix ending with an image) for later runs: ``fill(buffer)``
        writes its ``size`` bytes into the mapped file and returns how many it wrote."""
        key = self.key_of(items)
        if key is None or not self.writable:
            return
        header = json.dumps({"format": FORMAT, "key": key, "n_positions": n_positions, "n_items": len(items),
                             "state_bytes": size}).encode()
        start = len(MAGIC) + 4 + len(header)
        path = self._path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            sweep_once(self.directory)  # what runs that died while writing here left
            with atomic_file(path) as partial:
                partial.file.truncate(start + size + 4)
                with mmap.mmap(partial.file.fileno(), start + size + 4) as mapped:
                    mapped[:start] = MAGIC + struct.pack("<I", len(header)) + header
                    view = memoryview(mapped)
                    try:
                        written = fill(view[start : start + size])
                        crc = zlib.crc32(view[start : start + size])
                    finally:
                        view.release()
                    if written != size:
                        raise OSError(f"llama.cpp wrote {written} of {size} state bytes")
                    mapped[start + size :] = struct.pack("<I", crc)
            self.saved += 1
            self._evict(keep=path)
        except OSError as e:
            self.writable = False
            log.warning("prompt cache off for this run: cannot write in %s (%s)", self.directory, e)

    def _read(self, path: Path, key: str) -> tuple[int, memoryview] | None:
        """(positions, state) of a valid entry, mapped copy-on-write; a bad one is removed with one warning."""
        try:
            with path.open("rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            data = memoryview(mapped)
            if data[: len(MAGIC)] != MAGIC:
                raise ValueError("not a llava-gguf prompt cache file")
            (length,) = struct.unpack_from("<I", data, len(MAGIC))
            start = len(MAGIC) + 4
            header = json.loads(bytes(data[start : start + length]))
            if header.get("format") != FORMAT or header.get("key") != key:
                raise ValueError("written for another prompt or format")
            size = int(header["state_bytes"])
            if len(data) != start + length + size + 4:
                raise ValueError(f"truncated: {len(data)} bytes where {start + length + size + 4} belong")
            state = data[start + length : start + length + size]
            (crc,) = struct.unpack_from("<I", data, start + length + size)
            if zlib.crc32(state) != crc:
                raise ValueError("corrupt: checksum mismatch")
            n_positions = int(header["n_positions"])
        except OSError as e:
            log.warning("prompt cache entry %s unreadable (%s); ignored", path.name, e)
            return None
        except (ValueError, KeyError, TypeError, struct.error) as e:
            log.warning("prompt cache entry %s is bad (%s); removed", path.name, e)
            self.discard(path)
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return n_positions, state

    def discard(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass

    def discard_items(self, items: Sequence[Item]) -> None:
        """Remove the entry of ``items`` (llama.cpp refused its state)."""
        key = self.key_of(items)
        if key is not None:
            self.discard(self._path(key))

    def _evict(self, keep: Path) -> None:
        evict_lru(self.directory, f"*{SUFFIX}", self.max_bytes, keep=keep)
