"""Where the encoders' probe verdicts are kept: small JSON files in the cache root, one entry per
library key, written atomically; an unreadable file counts as empty."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from llava_gguf.paths import cache_root

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return cache_root()


def read_cache(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.debug("ignoring unreadable probe cache %s (%s)", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, data: dict[str, dict[str, object]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(data, indent=1))
        scratch.replace(path)
    except OSError as e:
        log.debug("could not cache the probe verdict in %s (%s)", path, e)
