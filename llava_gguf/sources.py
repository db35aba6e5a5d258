"""Where a model comes from, and what running it needs.

``resolve_model`` turns what a user names into an LLM GGUF and an mmproj GGUF on disk:

- ``--llm FILE --mmproj FILE``: those two files;
- ``ollama:NAME[:TAG]``: the model's blobs in ollama's store, in place (``llava_gguf.ollama``);
- a directory holding one LLM GGUF and one mmproj GGUF (or an LLM ``.gguf`` with its mmproj beside it);
- a Hub repo of pre-converted GGUF pairs: the LLM quant picked by ``quant``, the mmproj by a name holding
  "mmproj", both downloaded with ``hf_hub_download`` into the Hugging Face cache;
- a Hugging Face checkpoint (a directory or Hub repo with ``config.json``): converted once into
  ``<cache>/models/<name>-<key>/``, keyed by source, revision and quant, and reused after.

``<cache>`` is ``$LLAVA_GGUF_CACHE``, else ``$XDG_CACHE_HOME/llava-gguf``, else ``~/.cache/llava-gguf``.
Offline (``HF_HUB_OFFLINE=1``, or the Hub not answering ``llava_gguf.hub``'s one quick check) only cached
files are used; the error says what is missing and how to get it. Nothing here prints: progress goes
through callbacks, failures raise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from llava_gguf.convert.source import is_repo_id
from llava_gguf.errors import LlavaGGUFError, ModelLoadError
from llava_gguf.hub import how_to_get, hub_errors, offline_reason
from llava_gguf.metadata import CONVERTER_REVISION, GGUFFields, read_gguf
from llava_gguf.ollama import PREFIX as OLLAMA_PREFIX
from llava_gguf.ollama import is_ollama_name, resolve_ollama
from llava_gguf.partial import write_atomic
from llava_gguf.paths import models_dir

log = logging.getLogger(__name__)

MODEL_ENV = "LLAVA_GGUF_MODEL"
DEFAULT_QUANT = "Q4_K_M"
DEFAULT_MMPROJ_TYPE = "f16"

# (description, done, total): conversion progress, as `convert_checkpoint` reports it
ProgressCallback = Callable[[str, int, int], None]
EventCallback = Callable[[str], None]


# ---------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ModelRequest:
    """What the user named. ``quant``: the LLM file type to pick (Hub GGUF repos) or convert to."""

    model: str | None = None
    llm: Path | None = None
    mmproj: Path | None = None
    quant: str | None = None
    mmproj_type: str = DEFAULT_MMPROJ_TYPE
    revision: str | None = None


@dataclass(frozen=True)
class ModelFiles:
    llm: Path
    mmproj: Path
    origin: str  # where they came from, in words
    converted: bool = False  # converted by this call
    template_hint: str | None = None  # a prompt template text from where they came (ollama's)


def resolve_model(request: ModelRequest, progress: ProgressCallback | None = None,
                  on_event: EventCallback | None = None) -> ModelFiles:
    """The GGUF pair for ``request``, downloading or converting (once) what is needed."""
    event = on_event or (lambda message: None)
    if request.llm is not None or request.mmproj is not None:
        if request.llm is None or request.mmproj is None:
            raise ModelLoadError("give both --llm and --mmproj, or neither")
        for path in (request.llm, request.mmproj):
            if not path.is_file():
                raise ModelLoadError(f"{path}: no such file")
        return ModelFiles(request.llm, request.mmproj, "files")
    if not request.model:
        raise ModelLoadError(f"no model: pass -m (a directory, GGUF file or Hub repo id) or set {MODEL_ENV}")
    if is_ollama_name(request.model):
        found = resolve_ollama(request.model[len(OLLAMA_PREFIX):])
        event(f"using ollama's {found.name} from {found.llm.parent}")
        return ModelFiles(found.llm, found.mmproj, request.model, template_hint=found.template)
    path = Path(request.model).expanduser()
    if path.is_file():
        return _gguf_file(path)
    if path.is_dir():
        if any(path.glob("*.gguf")):
            llm, mmproj = _pick_local_pair(path, request.quant)
            return ModelFiles(llm, mmproj, str(path))
        if (path / "config.json").is_file():
            return _converted(str(path.resolve()), _local_fingerprint(path), request, progress, event)
        raise ModelLoadError(f"{path}: holds neither GGUF files nor a Hugging Face checkpoint (config.json)")
    if is_repo_id(request.model):
        return _from_hub(request.model, request, progress, event)
    raise ModelLoadError(f"{request.model}: no such file or directory, and not a Hub repo id (owner/name)")


def _gguf_file(path: Path) -> ModelFiles:
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: not a .gguf file; give a directory, a GGUF file or a Hub repo id")
    if "mmproj" in path.name.lower():
        raise ModelLoadError(f"{path} is an mmproj; give the LLM GGUF (or the directory, or --llm and --mmproj)")
    ggufs = sorted(p.name for p in path.parent.glob("*.gguf") if p != path)
    mmprojs = [n for n in ggufs if "mmproj" in n.lower()] or [n for n in ggufs if _is_clip(path.parent / n)]
    if not mmprojs:
        raise ModelLoadError(f"{path.parent}: no mmproj GGUF beside {path.name}; pass --llm and --mmproj")
    return ModelFiles(path, path.parent / pick_mmproj(path.name, mmprojs, str(path.parent)), str(path))


def find_gguf_pair(directory: Path) -> tuple[Path, Path]:
    """The LLM and mmproj GGUFs of a directory holding one of each (a conversion's output)."""
    files = sorted(directory.glob("*.gguf"))
    mmproj = [f for f in files if "mmproj" in f.name]
    llm = [f for f in files if f not in mmproj]
    if len(llm) != 1 or len(mmproj) != 1:
        raise ModelLoadError(
            f"{directory}: expected one LLM GGUF and one mmproj GGUF, found {len(llm)} and {len(mmproj)}; "
            "pass --llm and --mmproj"
        )
    return llm[0], mmproj[0]


def _pick_local_pair(directory: Path, quant: str | None) -> tuple[Path, Path]:
    """The pair in a directory of GGUFs (a download, LM Studio's folder): the mmproj by name, else by
    architecture (``clip``); among several LLMs, ``quant``'s (default Q4_K_M)."""
    names = [p.name for p in sorted(directory.glob("*.gguf"))]
    mmprojs = [n for n in names if "mmproj" in n.lower()] or [n for n in names if _is_clip(directory / n)]
    llm, mmproj = _pick(sorted(set(names) - set(mmprojs)), sorted(mmprojs), quant, str(directory))
    return directory / llm, directory / mmproj


def _is_clip(path: Path) -> bool:
    try:
        return GGUFFields(read_gguf(path)).get(gguf.Keys.General.ARCHITECTURE) == "clip"
    except LlavaGGUFError:
        return False


def pick_gguf_files(names: Sequence[str], quant: str | None, where: str) -> tuple[str, str]:
    """The LLM (matching ``quant``) and its mmproj among GGUF file names."""
    ggufs = [n for n in names if n.endswith(".gguf")]
    mmprojs = sorted(n for n in ggufs if "mmproj" in n.lower())
    return _pick(sorted(n for n in ggufs if n not in mmprojs), mmprojs, quant, where)


def _pick(llms: Sequence[str], mmprojs: Sequence[str], quant: str | None, where: str) -> tuple[str, str]:
    if not llms or not mmprojs:
        raise ModelLoadError(f"{where}: expected LLM and mmproj GGUF files, found {len(llms)} and {len(mmprojs)}")
    if quant is not None:
        matching = _with_quant(llms, quant)
        if len(matching) != 1:
            found = "none" if not matching else ", ".join(matching)
            raise ModelLoadError(f"{where}: {len(matching)} LLM file(s) match --quant {quant} ({found}); "
                                 f"available: {', '.join(llms)} (--quant also takes a file's name)")
        llm = matching[0]
    elif len(llms) == 1:
        llm = llms[0]
    else:
        # Q4_K_M, else the older files' "q4_k" (what llama.cpp's quantize called Q4_K_M)
        default = _with_quant(llms, DEFAULT_QUANT) or _with_quant(llms, "Q4_K")
        if len(default) != 1:
            raise ModelLoadError(f"{where} holds several LLM files ({', '.join(llms)}); pick one with --quant "
                                 "(a file type or a file's name)")
        llm = default[0]
    return llm, pick_mmproj(llm, mmprojs, where)


def _with_quant(llms: Sequence[str], quant: str) -> list[str]:
    """The LLM files of type ``quant`` (any spelling: Q5_K, q5_k, q_5_k), or the one so named."""
    if quant in llms:
        return [quant]
    wanted = re.sub(r"^q_(\d)", r"q\1", quant.lower().replace("-", "_"))
    pattern = re.compile(rf"(^|[._]){re.escape(wanted)}([._]|$)")
    normal = {n: re.sub(r"(^|[._])q_(\d)", r"\1q\2", n.lower().replace("-", "_")) for n in llms}
    exact = [n for n in llms if pattern.search(normal[n])]
    return exact or [n for n in llms if wanted in normal[n]]


_WORD = re.compile(r"\d+b(?![a-z])|[a-z]{2,}")  # "mistral", "vicuna", "yi", sizes such as "7b"
_NOT_FAMILY = {"mmproj", "model", "gguf", "ggml", "llava", "hf"}


def pick_mmproj(llm: str, mmprojs: Sequence[str], where: str) -> str:
    """The mmproj that belongs to ``llm``: the only one; else the one sharing the most name words
    with it ("mistral", "vicuna", "7b", "34b"), f16 and unquantized first; ambiguity is an error."""
    if len(mmprojs) == 1:
        return mmprojs[0]
    words = set(_WORD.findall(llm.lower())) - _NOT_FAMILY

    def score(name: str) -> tuple[int, int, int]:
        lowered = name.lower()
        shared = len(words & (set(_WORD.findall(lowered)) - _NOT_FAMILY))
        return shared, int("f16" in lowered), -len(re.findall(r"(?<![a-z])q_?\d", lowered))  # unquantized first

    ranked = sorted(mmprojs, key=score, reverse=True)
    if score(ranked[0]) == score(ranked[1]):
        tied = [n for n in ranked if score(n) == score(ranked[0])]
        raise ModelLoadError(f"{where}: several mmproj files could belong to {llm} ({', '.join(tied)}); "
                             "pass --llm and --mmproj (for a Hub repo, download the two files first)")
    return ranked[0]


# ---------------------------------------------------------------- conversion cache


def conversion_dir(source: str, fingerprint: str, revision: str | None, quant: str, mmproj_type: str) -> Path:
    """Where a checkpoint converted with these settings lives in the cache."""
    key = json.dumps([source, fingerprint, revision or "main", quant, mmproj_type, CONVERTER_REVISION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.\-]+", "_", source.rstrip("/").split("/")[-1]) or "model"
    return models_dir() / f"{name}-{quant}-{digest}"


def _local_fingerprint(path: Path) -> str:
    """Changes when the checkpoint's files do, so an edited checkpoint is converted again."""
    entries = []
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in {".json", ".safetensors", ".bin", ".model"}:
            stat = file.stat()
            entries.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def _convert_options(request: ModelRequest) -> tuple[str, str]:
    from llava_gguf.convert import MmprojType, Quant

    quant = (request.quant or DEFAULT_QUANT).upper()
    if quant not in {q.value for q in Quant}:
        raise ModelLoadError(f"cannot convert to --quant {request.quant}; choose one of {', '.join(q.value for q in Quant)}")
    mmproj_type = request.mmproj_type.lower()
    if mmproj_type not in {m.value for m in MmprojType}:
        raise ModelLoadError(f"unknown mmproj type {request.mmproj_type}")
    return quant, mmproj_type


def _cached_conversion(out: Path) -> tuple[Path, Path] | None:
    if not out.is_dir():
        return None
    try:
        return find_gguf_pair(out)
    except ModelLoadError:
        return None


def _converted(source: str, fingerprint: str, request: ModelRequest, progress: ProgressCallback | None,
               event: EventCallback, local_source: Path | None = None) -> ModelFiles:
    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    quant, mmproj_type = _convert_options(request)
    out = conversion_dir(source, fingerprint, request.revision, quant, mmproj_type)
    cached = _cached_conversion(out)
    if cached is not None:
        event(f"using the converted model in {out}")
        return ModelFiles(*cached, origin=source)
    event(f"converting {source} ({quant}) into {out}; this happens once")
    options = ConvertOptions(quant=Quant(quant), mmproj_type=MmprojType(mmproj_type), revision=request.revision,
                             name=source.rstrip("/").split("/")[-1])
    result = convert_checkpoint(local_source or source, out, options, progress)
    write_atomic(out / "source.json", json.dumps(
        {"source": source, "revision": request.revision, "quant": quant, "mmproj_type": mmproj_type}, indent=2).encode())
    return ModelFiles(result.llm, result.mmproj, origin=source, converted=True)


# ---------------------------------------------------------------- the Hub


def _from_hub(repo_id: str, request: ModelRequest, progress: ProgressCallback | None,
              event: EventCallback) -> ModelFiles:
    # A checkpoint converted earlier needs no Hub at all.
    quant, mmproj_type = _convert_options(request) if _convertible(request.quant) else (None, None)
    if quant is not None and mmproj_type is not None:
        out = conversion_dir(repo_id, "", request.revision, quant, mmproj_type)
        cached = _cached_conversion(out)
        if cached is not None:
            event(f"using the converted model in {out}")
            return ModelFiles(*cached, origin=repo_id)
    offline = offline_reason()
    files, snapshot = _list_repo(repo_id, request.revision, offline)
    ggufs = [f for f in files if f.endswith(".gguf")]
    if ggufs:
        llm, mmproj = pick_gguf_files(ggufs, request.quant, repo_id)
        event(f"using {llm} and {mmproj} from {repo_id}")
        return ModelFiles(_download(repo_id, llm, request.revision, offline is not None),
                          _download(repo_id, mmproj, request.revision, offline is not None), origin=repo_id)
    if "config.json" in files:
        # offline: convert from the cached snapshot (convert_checkpoint would ask the Hub)
        return _converted(repo_id, "", request, progress, event, local_source=snapshot)
    raise ModelLoadError(f"{repo_id}: holds neither GGUF files nor a Hugging Face checkpoint (config.json)")


def _convertible(quant: str | None) -> bool:
    from llava_gguf.convert import Quant

    return quant is None or quant.upper() in {q.value for q in Quant}


def _list_repo(repo_id: str, revision: str | None, offline: str | None) -> tuple[list[str], Path | None]:
    """The repo's file names (from the Hub, or from the cached snapshot when ``offline`` says why not)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if offline is None:
        try:
            with hub_errors(repo_id, ModelLoadError, revision=revision):
                return huggingface_hub.list_repo_files(repo_id, revision=revision), None
        except ModelLoadError as e:
            if isinstance(e.__cause__, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError)):
                raise
            log.info("the Hub cannot be reached (%s); looking in the cache", e)
        except Exception as e:  # noqa: BLE001  network failures come in many types (httpx, HfHubHTTPError)
            log.info("the Hub cannot be reached (%s); looking in the cache", e)
    snapshot = _cached_snapshot(repo_id, revision)
    if snapshot is None:
        why = offline or "the Hub cannot be reached"
        raise ModelLoadError(f"{repo_id} is not in the Hugging Face cache and {why}; {how_to_get(repo_id)}")
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    return files, snapshot


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _download(repo_id: str, filename: str, revision: str | None, offline: bool) -> Path:
    import huggingface_hub

    with hub_errors(repo_id, ModelLoadError, revision=revision, filename=filename):
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline))
