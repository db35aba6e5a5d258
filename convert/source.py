"""Where a checkpoint comes from: a local directory, or a Hub repo through huggingface_hub's cache."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from llava_gguf.errors import CheckpointError
from llava_gguf.hub import hub_errors, offline_reason

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
CONFIG_PATTERNS = ["*.json", "tokenizer.model", "*.jinja"]
WEIGHT_PATTERNS = ["*.safetensors"]
TORCH_PATTERNS = ["pytorch_model*.bin"]


def is_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not Path(source).exists()


def resolve_source(source: str | Path, *, revision: str | None = None, weights: bool = True) -> Path:
    """A local directory holding the checkpoint (downloading only the needed files from the Hub).

    ``HF_TOKEN`` is honoured by huggingface_hub itself; offline (``HF_HUB_OFFLINE``, or the Hub not
    answering) only the Hugging Face cache is used.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the checkpoint's directory")
        return path
    text = str(source)
    if not is_repo_id(text):
        raise CheckpointError(f"{text}: no such directory, and not a Hub repo id (owner/name)")
    patterns = CONFIG_PATTERNS + (WEIGHT_PATTERNS if weights else [])
    local = _download(text, revision, patterns)
    if weights and not any(local.glob("*.safetensors")):
        local = _download(text, revision, CONFIG_PATTERNS + TORCH_PATTERNS)
    return local


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    import huggingface_hub

    offline = offline_reason() is not None  # HF_HUB_OFFLINE, or the Hub does not answer: cached files only
    with hub_errors(repo_id, CheckpointError, revision=revision):
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                      local_files_only=offline))
