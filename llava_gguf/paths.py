"""Where llava-gguf keeps what it caches: converted models, image features, the libmtmd verdict,
the chat history. ``$LLAVA_GGUF_CACHE``, else ``$XDG_CACHE_HOME/llava-gguf``, else ``~/.cache/llava-gguf``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_ENV = "LLAVA_GGUF_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.environ.get("LOCALAPPDATA") if sys.platform == "win32" else None
    ) or "~/.cache"
    return Path(base).expanduser() / "llava-gguf"


def models_dir() -> Path:
    return cache_root() / "models"


def features_dir() -> Path:
    return cache_root() / "features"


def prompts_dir() -> Path:
    return cache_root() / "prompts"


def history_file() -> Path:
    return cache_root() / "chat_history"
