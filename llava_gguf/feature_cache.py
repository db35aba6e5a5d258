"""Packed image features, kept so the same image is not encoded twice: in memory for a session,
and on disk across runs when a directory is given (bounded in size, least recently used first out).
Entries are written through locked partial files (``llava_gguf.partial``); the first write of a run
removes those that runs which died left."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from llava_gguf.disk_cache import evict_lru
from llava_gguf.partial import atomic_file, sweep_once

log = logging.getLogger(__name__)


class FeatureCache:
    def __init__(self, directory: Path | None = None, max_bytes: int = 1 << 30, max_memory_bytes: int = 256 << 20) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_memory_bytes = max_memory_bytes
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.warning("image feature cache off for this run: cannot create %s (%s)", directory, e)
                self.directory = None

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        if self.directory is not None:
            path = self._path(key)
            try:
                features = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                pass
            else:
                os.utime(path)  # recently used
                self._remember(key, features)
                self.hits += 1
                return features
        self.misses += 1
        return None

    def put(self, key: str, features: np.ndarray) -> None:
        self._remember(key, features)
        if self.directory is None:
            return
        try:
            sweep_once(self.directory)  # what runs that died while writing here left
            with atomic_file(self._path(key)) as partial:
                np.save(partial.file, features, allow_pickle=False)
            self._evict()
        except OSError as e:
            log.warning("image feature cache off for this run: cannot write in %s (%s)", self.directory, e)
            self.directory = None

    def _remember(self, key: str, features: np.ndarray) -> None:
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > 1 and sum(f.nbytes for f in self._memory.values()) > self.max_memory_bytes:
            self._memory.popitem(last=False)

    def _evict(self) -> None:
        assert self.directory is not None
        evict_lru(self.directory, "*.npy", self.max_bytes)
