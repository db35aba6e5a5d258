"""The machine's verdicts, all at once: ``tune`` measures every probe now (the cache ignored, a calm
machine's verdicts written to it), ``cached_verdicts`` lists what the cache holds (``llava-gguf tune``,
``llava-gguf cache info``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.machine_load import BUSY_CORES
from llava_gguf.vision.probe_cache import (
    Provenance,
    default_cache_dir,
    figures_of,
    library_versions,
    provenance_of,
    read_cache,
    stale_reason,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tuned:
    """One probe's verdict, measured now."""

    probe: str  # "repack", "ggml-cpu", "ggml-gpu" or "mtmd"
    choice: str  # what auto picks from it: "repacking on" / "repacking off", "ggml" / "numpy", "mtmd ok" / ...
    reason: str  # the verdict with its figures, as the run's line says it
    provenance: Provenance | None  # when and how calmly measured; None: libmtmd's, or not measured
    cached: bool  # written to the cache (a timing: measured on a calm machine)

    @classmethod
    def measured(cls, probe: str, choice: str, reason: str, provenance: Provenance | None) -> Tuned:
        return cls(probe, choice, reason, provenance, provenance is not None and not provenance.provisional)


def tune(n_threads: int | None = None, cache_dir: str | os.PathLike[str] | None = None, *,
         ggml_library: str | os.PathLike[str] | None = None, gpu: bool = False,
         busy_cores: float = BUSY_CORES) -> list[Tuned]:
    """Measure every verdict now, as ``auto`` would with these threads (None: the run's default, every
    core); calm verdicts replace the cached ones. ``gpu``: also ggml's GPU probe. Takes a few seconds."""
    probes: list[Callable[[], Tuned]] = [lambda: _tune_repack(n_threads, cache_dir, busy_cores),
                                         lambda: _tune_ggml(n_threads, cache_dir, ggml_library, False, busy_cores)]
    if gpu:
        probes.append(lambda: _tune_ggml(n_threads, cache_dir, ggml_library, True, busy_cores))
    probes.append(lambda: _tune_mtmd(cache_dir))
    return [probe() for probe in probes]


def _tune_repack(n_threads: int | None, cache_dir: str | os.PathLike[str] | None, busy_cores: float) -> Tuned:
    from llava_gguf.llm.repack import choose_repack

    verdict = choose_repack(n_threads or os.cpu_count() or 2, cache_dir, use_cache=False, busy_cores=busy_cores)
    return Tuned.measured("repack", f"repacking {'on' if verdict.repack else 'off'}", verdict.reason, verdict.provenance)


def _tune_ggml(n_threads: int | None, cache_dir: str | os.PathLike[str] | None,
               ggml_library: str | os.PathLike[str] | None, gpu: bool, busy_cores: float) -> Tuned:
    from llava_gguf.errors import ModelLoadError
    from llava_gguf.vision.choose import probe_ggml
    from llava_gguf.vision.ggml_lib import GgmlUnavailable, load_ggml

    probe = "ggml-gpu" if gpu else "ggml-cpu"
    try:
        verdict = probe_ggml(load_ggml(ggml_library), cache_dir, use_gpu=gpu, n_threads=n_threads, use_cache=False,
                             busy_cores=busy_cores)
    except (GgmlUnavailable, ModelLoadError) as e:
        return Tuned(probe, "numpy", f"ggml cannot run here: {e}", None, False)
    if not verdict.exact:
        return Tuned.measured(probe, "numpy", f"ggml is off the reference by {verdict.max_rel_diff:.2g} (relative)",
                              verdict.provenance)
    if gpu:
        return Tuned.measured(probe, "ggml", f"ggml on the GPU is exact ({verdict.timing()})", verdict.provenance)
    faster = "ggml is faster" if verdict.ggml_faster else "NumPy is faster"
    return Tuned.measured(probe, "ggml" if verdict.ggml_faster else "numpy", f"{faster} here ({verdict.timing()})",
                          verdict.provenance)


def _tune_mtmd(cache_dir: str | os.PathLike[str] | None) -> Tuned:
    from llava_gguf.vision.mtmd_encoder import probe_mtmd

    verdict = probe_mtmd(cache_dir, use_cache=False)  # correctness, not speed: cached whatever the load
    return Tuned("mtmd", "mtmd ok" if verdict.ok else "mtmd not the reference", verdict.reason, None, True)


# -- the cache's contents ----------------------------------------------------------------------


@dataclass(frozen=True)
class CachedVerdict:
    """One entry of the probe cache."""

    probe: str  # "repack", "ggml" or "mtmd"
    file: Path
    key: str
    summary: str  # the verdict with its figures
    provenance: Provenance | None  # None: an entry without one (libmtmd's, or an older format)
    stale: str | None  # why the next run measures it again; None: it holds


def cached_verdicts(cache_dir: str | os.PathLike[str] | None = None) -> list[CachedVerdict]:
    """Every verdict in the probe cache, with its figures, date, load and versions, and whether it is
    stale (measured with other libraries or in an older format)."""
    from llava_gguf.llm.repack import PROBE_FILE
    from llava_gguf.vision.choose import GGML_PROBE_FILE
    from llava_gguf.vision.mtmd_encoder import PROBE_CACHE_FILE

    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    out: list[CachedVerdict] = []
    for probe, name in (("repack", PROBE_FILE), ("ggml", GGML_PROBE_FILE), ("mtmd", PROBE_CACHE_FILE)):
        path = root / name
        for key, entry in read_cache(path).items():
            if isinstance(entry, dict):
                out.append(_describe(probe, path, key, entry))
    return out


def _describe(probe: str, path: Path, key: str, entry: dict[str, object]) -> CachedVerdict:
    if probe == "mtmd":  # libmtmd's probe keys its entries by the libraries' files: a new build, a new key
        return CachedVerdict(probe, path, key, str(entry.get("reason", entry)), None, None)
    try:
        provenance: Provenance | None = provenance_of(entry)
    except (KeyError, ValueError):
        provenance = None
    library = provenance.about.get("library") if provenance is not None else None
    stale = stale_reason(entry, library_versions(Path(library)) if library else {})
    if stale is None and not library:
        stale = "malformed: no library recorded"
    return CachedVerdict(probe, path, key, _summary(probe, entry, provenance), provenance, stale)


def _summary(probe: str, entry: dict[str, object], provenance: Provenance | None) -> str:
    from llava_gguf.llm.repack import RepackVerdict
    from llava_gguf.vision.choose import GgmlVerdict

    try:
        if probe == "repack":
            return RepackVerdict.from_json(figures_of(entry), provenance).reason
        verdict = GgmlVerdict.from_json(figures_of(entry), provenance)
    except ValueError as e:
        return f"unreadable ({e})"
    if not verdict.exact:
        return f"ggml is off the reference by {verdict.max_rel_diff:.2g} (relative)"
    return f"{'ggml' if verdict.ggml_faster else 'NumPy'} is faster ({verdict.timing()})"
