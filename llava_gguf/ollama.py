"""Models in ollama's local store, used in place.

The store is ``$OLLAMA_MODELS``, else ``~/.ollama/models``. A model ``[host/][namespace/]name[:tag]``
(host ``registry.ollama.ai``, namespace ``library``, tag ``latest`` by default) has a manifest at
``manifests/<host>/<namespace>/<name>/<tag>``: JSON whose ``layers`` name blobs by digest
(``sha256:<hex>`` -> ``blobs/sha256-<hex>``) and media type. The LLM is the ``...image.model``
layer, the mmproj the ``...image.projector`` layer; the ``...image.template`` layer holds ollama's
prompt template (Go text/template), evidence for the conversation template (``llava-llama3``'s writes
``<|start_header_id|>``, ``llava-phi3``'s ``<|user|>``, ``llava`` and ``bakllava``'s ``USER: ... ASSISTANT:``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import ModelLoadError

PREFIX = "ollama:"
STORE_ENV = "OLLAMA_MODELS"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_MAX_TEMPLATE_BYTES = 1 << 20


@dataclass(frozen=True)
class OllamaModel:
    name: str  # as given, without the prefix
    llm: Path
    mmproj: Path
    template: str | None  # ollama's prompt template text, when the model has one


def store_dir() -> Path:
    return Path(os.environ.get(STORE_ENV) or "~/.ollama/models").expanduser()


def is_ollama_name(model: str) -> bool:
    return model.startswith(PREFIX)


def manifest_path(store: Path, name: str) -> Path:
    """``llava`` -> manifests/registry.ollama.ai/library/llava/latest; ``llava:7b``, ``me/llava:q4``,
    ``host/me/llava:q4`` likewise."""
    path, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:  # no tag (a colon before a slash is a host's port)
        path, tag = name, ""
    parts = path.split("/")
    if len(parts) > 3 or any(p in ("", ".", "..") for p in parts) or tag in (".", ".."):
        raise ModelLoadError(f"{PREFIX}{name}: not an ollama model name (name, name:tag or namespace/name:tag)")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return store.joinpath("manifests", *parts, tag or DEFAULT_TAG)


def resolve_ollama(name: str, store: Path | None = None) -> OllamaModel:
    """The blobs of an ollama model (``name`` without the ``ollama:`` prefix), checked against its manifest."""
    store = store or store_dir()
    manifest = _existing(manifest_path(store, name))
    if not manifest.is_file():
        known = ", ".join(installed_models(store)) or "none"
        raise ModelLoadError(f"{PREFIX}{name}: no such model in ollama's store {store} (installed: {known}); "
                             f"`ollama pull {name}` fetches it, {STORE_ENV} points at another store")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        by_type = {layer["mediaType"]: layer for layer in layers}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{manifest}: not a readable ollama manifest ({e})") from e
    if MEDIA_MODEL not in by_type:
        raise ModelLoadError(f"{PREFIX}{name}: its manifest names no model layer")
    if MEDIA_PROJECTOR not in by_type:
        raise ModelLoadError(f"{PREFIX}{name}: no image projector layer, so not a LLaVA model with a separate "
                             "projector; llava-gguf runs ollama's llava, bakllava, llava-llama3 and llava-phi3-style models")
    template = None
    if MEDIA_TEMPLATE in by_type:
        path = _blob(store, name, by_type[MEDIA_TEMPLATE])
        template = path.read_bytes()[:_MAX_TEMPLATE_BYTES].decode("utf-8", errors="replace")
    return OllamaModel(name, _blob(store, name, by_type[MEDIA_MODEL]), _blob(store, name, by_type[MEDIA_PROJECTOR]),
                       template)


def _blob(store: Path, name: str, layer: dict) -> Path:
    digest = _DIGEST.fullmatch(str(layer.get("digest", "")))
    if digest is None:
        raise ModelLoadError(f"{PREFIX}{name}: the manifest names a blob by {layer.get('digest')!r}, not a sha256 digest")
    path = store / "blobs" / f"sha256-{digest.group(1)}"
    if not path.is_file():
        raise ModelLoadError(f"{PREFIX}{name}: blob {path.name} ({layer.get('mediaType')}) is missing from {store}; "
                             f"`ollama pull {name}` fetches it again")
    size = layer.get("size")
    if isinstance(size, int) and path.stat().st_size != size:
        raise ModelLoadError(f"{PREFIX}{name}: blob {path.name} holds {path.stat().st_size} bytes, its manifest says "
                             f"{size}: an interrupted download? `ollama pull {name}` fetches it again")
    return path


def _existing(path: Path) -> Path:
    """``path``, or the file that differs from it only in letter case (ollama matches names that way)."""
    if path.is_file():
        return path
    parent = path.parent
    parts = []
    while not parent.is_dir() and parent != parent.parent:
        parts.append(parent.name)
        parent = parent.parent
    current = parent
    for part in [*reversed(parts), path.name]:
        match = next((c for c in current.iterdir() if c.name.lower() == part.lower()), None) if current.is_dir() else None
        if match is None:
            return path
        current = match
    return current


def installed_models(store: Path) -> list[str]:
    """The store's models as ollama names them (``llava:7b``, ``me/llava:latest``)."""
    root = store / "manifests"
    names = []
    for manifest in sorted(p for p in root.glob("*/*/*/*") if p.is_file()) if root.is_dir() else []:
        host, namespace, model, tag = manifest.relative_to(root).parts
        prefix = "" if host == DEFAULT_HOST and namespace == DEFAULT_NAMESPACE else (
            f"{namespace}/" if host == DEFAULT_HOST else f"{host}/{namespace}/")
        names.append(f"{prefix}{model}:{tag}")
    return names
