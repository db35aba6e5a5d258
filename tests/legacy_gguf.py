"""GGUF pairs written the way llama.cpp's legacy LLaVA tools write them, from a tiny original-layout
checkpoint, with gguf-py at test time.

The tools (``tools/mtmd/legacy-models/`` and ``examples/convert_legacy_llama.py`` in the
llama-cpp-python sdist): ``llava_surgery.py`` (1.5) / ``llava_surgery_v2.py`` (1.6) split the projector
(and 1.6's tower and ``model.image_newline``) out of the checkpoint; ``convert_image_encoder_to_gguf.py``
writes the mmproj from the CLIP repo (1.5) or the extracted tower with cmp-nct's ``config_vit.json``
(1.6, ``--clip-model-is-vision``); the LLM becomes a plain llama GGUF. What the mmproj looks like:

- the tower trimmed to the selected layer (``block_count`` = layers - 1), no post-layernorm;
- ``mlp.fc1`` stored as ``ffn_down`` and ``mlp.fc2`` as ``ffn_up``;
- 4-D tensors and the projector's matrices always f16; other ``.weight`` matrices f16 unless ``--use-f32``;
  everything else f32;
- ``clip.projector_type`` only in files from 2024 on, ``clip.vision.feature_layer`` only from 2025 on and
  only where the config names the select layer (1.6's ``config_vit.json`` does, the CLIP repo does not);
- 1.6 adds the config's pinpoints flattened, ``image_aspect_ratio``, ``mm_patch_merge_type``,
  ``image_crop_resolution`` and the projector's ``model.image_newline``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from checkpoints import TinyCheckpoint
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
from safetensors.torch import load_file

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

KEY_SETS = ("old", "new")  # old: no projector_type / feature_layer; new: both where the script writes them
QUANT_BLOCK_TYPES = (gguf.GGMLQuantizationType.Q8_0,)

# CLIP state dict name (after "vision_model.") -> the legacy converter's GGUF name; {i}: the block
_TOWER_NAMES = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up",  # swapped, as the legacy converter names them
}
_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _tower_name(name: str) -> str | None:
    if name in _TOWER_NAMES:
        return _TOWER_NAMES[name]
    m = _BLOCK.fullmatch(name)
    if m is None:
        return None  # post_layernorm, position_ids: skipped
    return f"v.blk.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _tower_and_config(ckpt: TinyCheckpoint) -> tuple[dict[str, torch.Tensor], dict]:
    """The CLIP tower's tensors (``vision_model.`` stripped) and the config the converter reads."""
    assert ckpt.layout == "original" and ckpt.clip_path is not None
    if ckpt.llava_version == "1.5":  # the CLIP repo, as CLIPModel
        tensors = load_file(str(ckpt.clip_path / "model.safetensors"))
        config = json.loads((ckpt.clip_path / "config.json").read_text())
        return {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}, config
    # 1.6: llava.clip from the checkpoint, with config_vit.json (a CLIPVisionModel config plus LLaVA's keys)
    tensors = _checkpoint_tensors(ckpt)
    prefix = "model.vision_tower.vision_tower.vision_model."
    llava = json.loads((ckpt.path / "config.json").read_text())
    clip = json.loads((ckpt.clip_path / "config.json").read_text())["vision_config"]
    config = {**clip, **{k: llava[k] for k in (
        "image_aspect_ratio", "image_crop_resolution", "image_grid_pinpoints", "image_split_resolution",
        "mm_patch_merge_type", "mm_projector_type", "mm_vision_select_layer")}}
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, config


def _checkpoint_tensors(ckpt: TinyCheckpoint) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(ckpt.path.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def write_legacy_mmproj(ckpt: TinyCheckpoint, dest: Path, *, use_f32: bool = False, key_set: str = "old",
                        newline_name: str = "model.image_newline",
                        quant: gguf.GGMLQuantizationType | None = None) -> Path:
    """An mmproj as ``convert_image_encoder_to_gguf.py --llava-projector`` writes it (``quant``: then its
    blocks' and projector's matrices quantized, as llama.cpp's clip quantizer does)."""
    assert key_set in KEY_SETS
    tower, config = _tower_and_config(ckpt)
    vision = config.get("vision_config", config)
    select = config.get("mm_vision_select_layer")
    n_layers = vision["num_hidden_layers"]
    feature_layers = None if select is None else [select if select >= 0 else n_layers + select + 1]
    block_count = max(feature_layers) if feature_layers else n_layers - 1
    projector = {k: v for k, v in _checkpoint_tensors(ckpt).items()
                 if k.startswith("model.mm_projector") or k == "model.image_newline"}

    writer = gguf.GGUFWriter(dest, "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_file_type(0 if use_f32 else 1)
    writer.add_name(config.get("_name_or_path", "vit"))
    writer.add_description("image encoder for LLaVA")
    if key_set == "new":
        writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", vision["image_size"])
    writer.add_uint32("clip.vision.patch_size", vision["patch_size"])
    writer.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    writer.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    writer.add_uint32("clip.vision.projection_dim", vision.get("projection_dim", config.get("projection_dim", 0)))
    writer.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision["layer_norm_eps"])
    writer.add_uint32("clip.vision.block_count", block_count)
    if "image_grid_pinpoints" in vision:
        writer.add_array("clip.vision.image_grid_pinpoints", [int(x) for pair in vision["image_grid_pinpoints"] for x in pair])
    for key in ("image_crop_resolution", "image_split_resolution"):
        if key in vision:
            writer.add_uint32(f"clip.vision.{key}", vision[key])
    for key in ("image_aspect_ratio", "mm_patch_merge_type", "mm_projector_type"):
        if key in vision:
            writer.add_string(f"clip.vision.{key}", vision[key])
    if key_set == "new" and feature_layers:
        writer.add_array("clip.vision.feature_layer", feature_layers)
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    writer.add_bool("clip.use_gelu", vision["hidden_act"] == "gelu")

    # projector first (its matrices always f16), then the trimmed tower
    for name, tensor in projector.items():
        out = "model.image_newline" if name == "model.image_newline" else name.replace("model.mm_projector", "mm")
        if out == "model.image_newline":
            out = newline_name
        data = tensor.float().squeeze().numpy()
        _add(writer, out, data.astype(np.float16 if data.ndim in (2, 4) else np.float32), quant)
    for name, tensor in tower.items():
        out = _tower_name(name)
        m = _BLOCK.fullmatch(name)
        if out is None or (m is not None and int(m.group(1)) >= block_count):
            continue
        data = tensor.float().squeeze().numpy()
        if data.ndim == 4 or (not use_f32 and name.endswith(".weight") and data.ndim == 2):
            data = data.astype(np.float16)
        _add(writer, out, data.astype(data.dtype), quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _add(writer: gguf.GGUFWriter, name: str, data: np.ndarray, quant: gguf.GGMLQuantizationType | None) -> None:
    quantize = (quant is not None and data.ndim == 2 and name.endswith(".weight")
                and (name.startswith("v.blk.") or name.startswith("mm.")) and data.shape[-1] % 32 == 0)
    if not quantize:
        writer.add_tensor(name, data)
        return
    assert quant is not None
    blocks = gguf.quants.quantize(data.astype(np.float32), quant)  # [out, in] -> [out, n_bytes] uint8
    writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=quant)


def write_legacy_llm(ckpt: TinyCheckpoint, dest: Path, work: Path, name: str = "LLaMA v2") -> Path:
    """A plain llama GGUF (F32): the checkpoint's LLM with nothing that names LLaVA, its template or
    its version, as ``convert_legacy_llama.py`` writes one (``general.name`` from the model's shape)."""
    result = convert_checkpoint(ckpt.path, work, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    reader = gguf.GGUFReader(result.llm)
    drop = [key for key in reader.fields if key.startswith("llava_gguf.")] + [gguf.Keys.Tokenizer.CHAT_TEMPLATE]
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dest, arch)
    copy_with_new_metadata(reader, writer, {
        gguf.Keys.General.NAME: MetadataDetails(gguf.GGUFValueType.STRING, name),
    }, drop)
    return dest


# ---------------------------------------------------------------- Llama-3 and Phi-3 LLaVAs (xtuner's, ollama's)
#
# xtuner's LLaVA-Llama-3 / LLaVA-Phi-3 GGUF repos and ollama's llava-llama3 / llava-phi3 hold an LLM GGUF from
# llama.cpp's convert_hf_to_gguf.py (Llama-3: llama architecture, byte-level BPE vocabulary, `tokenizer.ggml.model
# = gpt2`, pre-tokenizer `llama-bpe`; Phi-3: the `phi3` architecture, fused qkv and gate/up, an SPM vocabulary with
# the chat tokens added) and a legacy LLaVA 1.5 mmproj (CLIP-L/336 and the MLP projector).

# Llama-3's split pattern (tokenizer.json's pre_tokenizer), llama.cpp's `llama-bpe`
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>")
_CORPUS = ["What is in the picture? Describe the image in one sentence.", "A cat sits on a red mat near the door.",
           "The assistant answers the user's questions about images.", "There are two dogs and 3 birds here!",
           "user assistant system\n\nHello, how are you today?\n"] * 4


def llama3_tokenizer(extra_special: tuple[str, ...] = ()):
    """A tiny Llama-3-style tokenizer (``tokenizers``): byte-level BPE over Llama-3's split pattern,
    ``ignore_merges`` as Llama-3's tokenizer.json, its special tokens, BOS added by the post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.add_special_tokens([*LLAMA3_SPECIAL, *extra_special])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def _bpe_vocab(tok) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) as convert_hf_to_gguf.py writes a gpt2-model vocabulary."""
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def _spm_vocab_with(llm: Path, added: tuple[str, ...]) -> tuple[list[str], list[float], list[int]]:
    """A legacy LLM's SentencePiece vocabulary with Phi-3's chat tokens added after it (control tokens)."""
    reader = gguf.GGUFReader(llm)
    tokens = list(reader.fields[gguf.Keys.Tokenizer.LIST].contents())
    scores = [float(s) for s in reader.fields[gguf.Keys.Tokenizer.SCORES].contents()]
    types = [int(t) for t in reader.fields[gguf.Keys.Tokenizer.TOKEN_TYPE].contents()]
    return ([*tokens, *added], [*scores, *([0.0] * len(added))],
            [*types, *([int(gguf.TokenType.CONTROL)] * len(added))])


def write_family_llm(dest: Path, family: str, n_embd: int, *, spm_source: Path | None = None, answer: str = "the",
                     stop: str | None = None, eos_token_ids: list[int] | None = None,
                     chat_template: str | None = None, extra_special: tuple[str, ...] = (),
                     keys: dict[str, str | int] | None = None, name: str | None = None, n_layers: int = 2,
                     seed: int = 0) -> Path:
    """An F32 LLM GGUF of a Llama-3 (``family="llama3"``) or Phi-3 (``"phi3"``) LLaVA, as llama.cpp's converter
    writes one, whose greedy answer to any prompt is the one token ``answer`` and then ``stop`` (by default the
    family's end of turn, ``<|eot_id|>`` / ``<|end|>``).

    How: the blocks' outputs are tiny (the residual stream is the current token's embedding, give or take
    1e-3), every embedding but ``answer``'s has +1 in dimension 0 and ``answer``'s has -1, and the output rows
    of ``answer`` and ``stop`` are +10 and -10 times dimension 0: after any other token ``answer`` wins, after
    ``answer`` ``stop`` does. ``eos_token_ids`` writes ``llava_gguf.eos_token_ids``; ``extra_special``: more
    special tokens (llava-hf's ``<image>``); ``keys``: more string / int keys (``llava_gguf.template``...)."""
    rng = np.random.default_rng(seed)
    arch = "phi3" if family == "phi3" else "llama"
    writer = gguf.GGUFWriter(dest, arch)
    # the names convert_hf_to_gguf.py derives from the repos (llama.cpp's Phi-3 whitespace rule misses this one)
    writer.add_name(name or {"llama3": "Meta Llama 3 8B Instruct", "phi3": "Phi 3 Mini 4k Instruct"}[family])
    if family == "llama3":
        tokens, types, merges = _bpe_vocab(llama3_tokenizer(extra_special))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
        writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
        stop = stop or "<|eot_id|>"
        answer_id = tokens.index(next(t for t in tokens if t == answer or t == "Ġ" + answer))
    else:
        assert spm_source is not None, "Phi-3's vocabulary extends a SentencePiece one"
        tokens, scores, types = _spm_vocab_with(spm_source, PHI3_ADDED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(tokens.index("<s>"))
        writer.add_eos_token_id(tokens.index("<|endoftext|>"))
        writer.add_unk_token_id(tokens.index("<unk>"))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        stop = stop or "<|end|>"
        answer_id = tokens.index(next(t for t in tokens if t in ("▁" + answer, answer)))
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if eos_token_ids is not None:
        writer.add_array("llava_gguf.eos_token_ids", eos_token_ids)
    for key, value in (keys or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    stop_id = tokens.index(stop)
    n_vocab, n_head, n_ff = len(tokens), 4, 2 * n_embd
    writer.add_context_length(2048)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head if family == "phi3" else n_head // 2)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(500000.0 if family == "llama3" else 10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if family == "llama3":
        writer.add_vocab_size(n_vocab)

    def small(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 1e-3).astype(np.float32)

    embd = rng.standard_normal((n_vocab, n_embd)).astype(np.float32)  # [n_vocab, n_embd]
    embd[:, 0] = 1.0
    embd[answer_id, 0] = -1.0
    output = np.zeros((n_vocab, n_embd), np.float32)  # [n_vocab, n_embd]
    output[answer_id, 0], output[stop_id, 0] = 10.0, -10.0
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    writer.add_tensor("output.weight", output)
    head_dim = n_embd // n_head
    n_kv = n_head if family == "phi3" else n_head // 2
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(f"blk.{i}.attn_output.weight", small(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", small(n_embd, n_ff))
        if family == "phi3":  # fused [q; k; v] and [gate; up], as Phi-3 stores them
            writer.add_tensor(f"blk.{i}.attn_qkv.weight", small(n_embd + 2 * n_kv * head_dim, n_embd) * 100)
            writer.add_tensor(f"blk.{i}.ffn_up.weight", small(2 * n_ff, n_embd) * 100)
        else:
            writer.add_tensor(f"blk.{i}.attn_q.weight", small(n_embd, n_embd) * 100)
            writer.add_tensor(f"blk.{i}.attn_k.weight", small(n_kv * head_dim, n_embd) * 100)
            writer.add_tensor(f"blk.{i}.attn_v.weight", small(n_kv * head_dim, n_embd) * 100)
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", small(n_ff, n_embd) * 100)
            writer.add_tensor(f"blk.{i}.ffn_up.weight", small(n_ff, n_embd) * 100)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
