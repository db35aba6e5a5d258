"""Directories of cache files bounded in size: least recently used out first (a file's mtime is its
last use), usage, clearing. The feature and prompt caches keep their entries this way. Partial files
(``llava_gguf.partial``) that dead writers left are counted and cleared too; live writers' never."""

from __future__ import annotations

from pathlib import Path

from llava_gguf.partial import stale_usage, sweep, sweep_tree


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
    """Remove a cache directory's entries and the partial files of writers that died there (those of
    live writers stay); (files, bytes) removed."""
    files = size = 0
    for path in directory.glob(pattern) if directory.is_dir() else []:
        try:
            entry = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        files, size = files + 1, size + entry
    swept = sweep(directory)
    return files + swept.files, size + swept.bytes


def partial_usage(root: Path) -> tuple[int, int]:
    """(files, bytes) of the partial files that writers which died left anywhere under ``root``."""
    found = stale_usage(root)
    return found.files, found.bytes


def clear_partials(root: Path) -> tuple[int, int]:
    """Remove the partial files that writers which died left anywhere under ``root`` (converted models'
    folders included); (files, bytes) removed."""
    removed = sweep_tree(root)
    return removed.files, removed.bytes
