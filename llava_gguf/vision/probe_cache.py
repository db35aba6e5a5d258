"""Where the probes' verdicts are kept: small JSON files in the cache root, one entry per key (what the
verdict is about: the machine, the thread count, the library), written atomically; an unreadable file
counts as empty.

An entry holds its figures, when it was measured (ISO 8601, UTC), the machine's load meanwhile
(``machine_load``) and the versions it was measured with (llama-cpp-python, NumPy, the ggml build); one
of an older format or of other versions is stale and measured again. Only a verdict measured on a calm
machine is written: one measured while other processes used the cores is provisional, held by the
process (the run) that measured it, for all its lookups, and measured again by the next.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from llava_gguf.machine_load import MachineLoad
from llava_gguf.partial import write_atomic
from llava_gguf.paths import cache_root

log = logging.getLogger(__name__)

FORMAT = 2  # of an entry; 1: the figures alone, without date, load or versions
_FORMAT, _MEASURED_AT, _LOAD, _VERSIONS, _ABOUT = "format", "measured_at", "load", "versions", "about"
_PROVENANCE_KEYS = (_FORMAT, _MEASURED_AT, _LOAD, _VERSIONS, _ABOUT)


def default_cache_dir() -> Path:
    return cache_root()


@dataclass(frozen=True)
class Provenance:
    """How a verdict was measured: when, on how calm a machine, with which libraries."""

    measured_at: str  # ISO 8601, UTC
    load: MachineLoad
    versions: Mapping[str, str]
    about: Mapping[str, str] = field(default_factory=dict)  # the key in words: CPU, threads, library
    provisional: bool = False  # measured on a busy machine: for this run only, not cached
    cached: bool = False  # read from the cache (else measured by this process)

    def note(self) -> str:
        """One clause for the verdict's line."""
        if self.provisional:
            return f"provisional: {self.load.describe()} meanwhile; measured again next run"
        return f"cached {self.measured_at[:10]}" if self.cached else "measured now"

    def to_json(self) -> dict[str, object]:
        return {_FORMAT: FORMAT, _MEASURED_AT: self.measured_at, _LOAD: self.load.to_json(),
                _VERSIONS: dict(self.versions), _ABOUT: dict(self.about)}


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- versions ---------------------------------------------------------------------------------


def library_versions(ggml_directory: Path) -> dict[str, str]:
    """llama-cpp-python's and NumPy's versions and the ggml build in ``ggml_directory``: its version and
    commit where it says them, and its library files' sizes and dates (a rebuild of the same commit)."""
    try:
        llama = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        llama = "absent"
    return {"llama-cpp-python": llama, "numpy": np.__version__, "ggml": _ggml_version(ggml_directory),
            "ggml-files": _library_fingerprint(ggml_directory)}


def _ggml_version(directory: Path) -> str:
    names = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    path = directory / names.get(sys.platform, "libggml-base.so")
    try:
        lib = ctypes.CDLL(str(path))  # already loaded by llama_cpp or the ggml encoder: no new mapping
        version, commit = lib.ggml_version, lib.ggml_commit
    except (OSError, AttributeError):
        return "unknown"
    version.restype = commit.restype = ctypes.c_char_p
    return f"{(version() or b'?').decode()} ({(commit() or b'?').decode()})"


def _library_fingerprint(directory: Path) -> str:
    parts = []
    for path in sorted(directory.glob("*")):
        if path.is_file() and ("ggml" in path.name or "llama" in path.name):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# -- entries ----------------------------------------------------------------------------------


def read_cache(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.debug("ignoring unreadable probe cache %s (%s)", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, data: dict[str, dict[str, object]]) -> bool:
    """Whether it was written (an unwritable cache is not an error: the verdict is measured again)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1).encode())
    except OSError as e:
        log.debug("could not cache the probe verdict in %s (%s)", path, e)
        return False
    return True


def stale_reason(entry: Mapping[str, object], versions: Mapping[str, str]) -> str | None:
    """Why a cached entry must be measured again (None: it holds)."""
    if entry.get(_FORMAT) != FORMAT:
        return f"an older format ({entry.get(_FORMAT, 1)}, now {FORMAT})"
    measured = entry.get(_VERSIONS)
    if not isinstance(measured, Mapping):
        return "no versions recorded"
    changed = [f"{name} {measured.get(name)} -> {now}" for name, now in versions.items() if measured.get(name) != now]
    return f"measured with other libraries ({', '.join(changed)})" if changed else None


def provenance_of(entry: Mapping[str, object]) -> Provenance:
    """A cached entry's provenance; ``ValueError`` when malformed."""
    versions, about = entry.get(_VERSIONS), entry.get(_ABOUT, {})
    if not isinstance(versions, Mapping) or not isinstance(about, Mapping):
        raise ValueError("malformed probe entry: versions")
    return Provenance(str(entry[_MEASURED_AT]) if _MEASURED_AT in entry else "?",
                      MachineLoad.from_json(entry.get(_LOAD)), {str(k): str(v) for k, v in versions.items()},
                      {str(k): str(v) for k, v in about.items()}, cached=True)


# This process's provisional verdicts: a run measures a busy machine's verdict once and keeps to it
# (the memory line and the runtime, every model it loads), the next process measures again.
_provisional: dict[tuple[str, str], dict[str, object]] = {}


def _run_key(path: Path, key: str) -> tuple[str, str]:
    return os.path.abspath(path), key


def forget_provisional() -> None:
    """Forget this process's provisional verdicts, as a new run would (tests)."""
    _provisional.clear()


def lookup(path: Path, key: str, versions: Mapping[str, str]) -> tuple[dict[str, object], Provenance] | None:
    """The figures of ``key``'s entry and how they were measured (this run's provisional verdict first),
    or None where there is none or it is stale or malformed (then the caller measures again)."""
    held = _provisional.get(_run_key(path, key))
    if held is not None and stale_reason(held, versions) is None:
        return figures_of(held), replace(provenance_of(held), cached=False, provisional=True)
    entry = read_cache(path).get(key)
    if not isinstance(entry, dict):
        return None
    reason = stale_reason(entry, versions)
    if reason is not None:
        log.debug("measuring again: %s in %s", reason, path)
        return None
    try:
        provenance = provenance_of(entry)
    except (KeyError, ValueError) as e:
        log.debug("measuring again: %s in %s", e, path)
        return None
    return figures_of(entry), provenance


def figures_of(entry: Mapping[str, object]) -> dict[str, object]:
    """An entry without its provenance."""
    return {k: v for k, v in entry.items() if k not in _PROVENANCE_KEYS}


def store(path: Path, key: str, figures: Mapping[str, object], provenance: Provenance) -> bool:
    """Cache a calm machine's verdict (the file read again, so other keys' entries stay); a provisional
    one is only held for this run. Whether it was written."""
    if provenance.provisional:
        log.debug("not caching a provisional verdict (%s)", provenance.load.describe())
        _provisional[_run_key(path, key)] = {**figures, **provenance.to_json()}
        return False
    _provisional.pop(_run_key(path, key), None)
    cached = read_cache(path)
    cached[key] = {**figures, **provenance.to_json()}
    return write_cache(path, cached)
