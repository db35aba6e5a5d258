"""The converter: a Hugging Face LLaVA checkpoint to an LLM GGUF and an mmproj GGUF."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf

from llava_gguf.convert.checkpoint import LlavaCheckpoint, read_checkpoint
from llava_gguf.convert.llm import plan_llm_tensors, write_llm
from llava_gguf.convert.mmproj import MmprojType, plan_mmproj_tensors, write_mmproj
from llava_gguf.convert.quantize import Quant, quantize_gguf
from llava_gguf.convert.source import is_repo_id, resolve_source
from llava_gguf.convert.tensors import TensorStore
from llava_gguf.convert.writer import ProgressCallback, atomic_output, check_writable, scratch_file, sweep_output
from llava_gguf.errors import CheckpointError

__all__ = ["ConvertOptions", "ConvertResult", "MmprojType", "Quant", "convert_checkpoint", "read_checkpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertOptions:
    quant: Quant = Quant.Q4_K_M
    mmproj_type: MmprojType = MmprojType.F16
    vision_tower: str | None = None  # overrides the original layout's mm_vision_tower
    revision: str | None = None
    threads: int | None = None
    name: str | None = None  # output file stem; defaults to the checkpoint's name


@dataclass(frozen=True)
class ConvertResult:
    llm: Path
    mmproj: Path
    checkpoint: LlavaCheckpoint


def output_names(name: str, options: ConvertOptions) -> tuple[str, str]:
    return f"{name}.{options.quant.value}.gguf", f"{name}.mmproj-{options.mmproj_type.value}.gguf"


def convert_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    options: ConvertOptions = ConvertOptions(),
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert ``source`` (a local directory or a Hub repo id) into ``out_dir``.

    ``progress(description, done_bytes, total_bytes)`` is called after each tensor written.
    Both files appear only when both are complete; partial files that earlier conversions which died
    left in ``out_dir`` are removed first.
    """
    out = Path(out_dir).expanduser()
    check_writable(out)
    sweep_output(out)
    path = resolve_source(source, revision=options.revision)

    def resolve_tower(tower: str) -> Path:
        return resolve_source(options.vision_tower or tower, weights=True)

    ckpt = read_checkpoint(path, resolve_tower)
    name = options.name or (str(source).rstrip("/").split("/")[-1] if is_repo_id(str(source)) else path.name)
    store = TensorStore.open(path)
    clip_store = TensorStore.open(ckpt.clip_path) if ckpt.clip_weights_from_repo and ckpt.clip_path else None
    if clip_store is not None and not clip_store.names():
        raise CheckpointError(f"{ckpt.clip_path}: the CLIP vision tower repo has no weights")
    intermediate = _intermediate_type(store, options.quant)
    # Check both halves before writing anything.
    plan_llm_tensors(ckpt, store, intermediate)
    plan_mmproj_tensors(ckpt, store, clip_store, options.mmproj_type)
    llm_name, mmproj_name = output_names(name, options)
    llm_path, mmproj_path = out / llm_name, out / mmproj_name

    def stage(label: str) -> ProgressCallback | None:
        if progress is None:
            return None
        return lambda tensor, done, total: progress(f"{label} {tensor}", done, total)

    with atomic_output(mmproj_path) as mmproj_tmp, atomic_output(llm_path) as llm_tmp:
        write_mmproj(ckpt, store, clip_store, mmproj_tmp, options.mmproj_type, stage("mmproj"))
        if options.quant.needs_quantizer:
            with scratch_file(out, f"{name}.{intermediate.name}.gguf") as unquantized:
                write_llm(ckpt, store, unquantized, intermediate, stage(f"llm {intermediate.name}"))
                label = f"quantizing to {options.quant.value}"
                if progress is not None:
                    progress(label, 0, 1)
                quantize_gguf(unquantized, llm_tmp, options.quant, options.threads)
                if progress is not None:
                    progress(label, 1, 1)
        else:
            write_llm(ckpt, store, llm_tmp, intermediate, stage(f"llm {intermediate.name}"))
    log.info("wrote %s and %s", llm_path, mmproj_path)
    return ConvertResult(llm_path, mmproj_path, ckpt)


def _intermediate_type(store: TensorStore, quant: Quant) -> gguf.GGMLQuantizationType:
    """The LLM's type before llama.cpp quantizes it: lossless for bf16 sources, else f16."""
    if quant is Quant.F32:
        return gguf.GGMLQuantizationType.F32
    if quant is Quant.F16:
        return gguf.GGMLQuantizationType.F16
    dtypes = {ref.dtype for ref in store.iter_refs()}
    return gguf.GGMLQuantizationType.BF16 if dtypes == {"BF16"} else gguf.GGMLQuantizationType.F16

