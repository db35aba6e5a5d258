"""Directories of cache files bounded in size: least recently used out first (a file's mtime is its
last use), usage, clearing. The feature and prompt caches keep their entries this way."""

from __future__ import annotations

from pathlib import Path


def evict_lru(directory: Path, pattern: str, max_bytes: int, keep: Path | None = None) -> None:
    """Remove the least recently used ``pattern`` files until the rest fit in ``max_bytes`` (``keep`` stays)."""
    entries = []
    for path in directory.glob(pattern):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime_ns, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path == keep:
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError:
            continue
        total -= size


def cache_usage(directory: Path, pattern: str) -> tuple[int, int]:
    """(files, bytes) of a cache directory's entries."""
    files = size = 0
    for path in directory.glob(pattern) if directory.is_dir() else []:
        try:
            size += path.stat().st_size
            files += 1
        except OSError:
            continue
    return files, size


def clear_cache(directory: Path, pattern: str) -> tuple[int, int]:
    """Remove a cache directory's entries (and leftover partial files); (files, bytes) removed."""
    removed = cache_usage(directory, pattern)
    for path in list(directory.glob(pattern)) + list(directory.glob(".*.partial")) if directory.is_dir() else []:
        try:
            path.unlink()
        except OSError:
            continue
    return removed
