"""The LLaVA family's other LLMs against transformers' own pipeline on the same weights: a Llama-3 LLM
(byte-level BPE) under LLaVA 1.5 and LLaVA-NeXT, Phi-3, Qwen2 (ChatML, <|im_end|> stops) and a Mistral LLaVA 1.5
(BakLLaVA's shape).

The reference is what a user of the llava-hf checkpoint runs: ``AutoProcessor.from_pretrained(dir)``,
``apply_chat_template(messages, add_generation_prompt=True)``, ``processor(images=..., text=...)`` and
``model.generate`` (greedy, stopping where the checkpoint's generation config says). Ours converts the
checkpoint to F32 and answers with an F32 KV cache: the prompt ids (image positions expanded) equal the
processor's ``input_ids``, and the greedy tokens are the same, for one image, two, and a second turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_runtime import EXACT, random_image
from test_templates_families import LLAVA15_HF
from transformers import AutoProcessor

from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.sequence import ImageSlot
from llava_gguf.model import GenerationOptions, LlavaModel

KINDS = [("1.5", "llama3"), ("1.6", "llama3"), ("1.5", "phi3"), ("1.5", "qwen2"), ("1.5", "mistral")]
N_NEW = 16
GREEDY = GenerationOptions(max_tokens=N_NEW, sampling=SamplingOptions(temperature=0.0))


@pytest.fixture(scope="module")
def interleave(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """llava-interleave's shape: a SigLIP tower (the last hidden state, every position) before a Qwen2 LLM with
    tied embeddings, converted to F32 (mmproj f32, f16 and q8_0)."""
    from checkpoints import build_family_checkpoint
    from siglip_checkpoints import siglip_vision_config

    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    root = tmp_path_factory.mktemp("interleave")
    ckpt = build_family_checkpoint(root, family="qwen2", vision=siglip_vision_config(), tie_word_embeddings=True,
                                   vision_feature_select_strategy="full", vision_feature_layer=-1)
    pairs = {}
    for mmproj_type in (MmprojType.F32, MmprojType.F16, MmprojType.Q8_0):
        result = convert_checkpoint(ckpt.path, root / f"gguf-{mmproj_type.value}",
                                    ConvertOptions(quant=Quant.F32, mmproj_type=mmproj_type))
        pairs[mmproj_type.value] = result.llm, result.mmproj
    return ckpt, pairs


def test_llava_interleave_siglip_and_qwen2(interleave, tmp_path: Path) -> None:
    """llava-interleave (SigLIP + Qwen2, one untiled 729-position view per image): counts, prompt ids and greedy
    tokens of transformers' pipeline, one image, two images, a second turn."""
    ckpt, pairs = interleave
    first, second = random_image(90, 50, seed=1), random_image(1, 200, seed=2)
    paths = [_save(first, tmp_path, "a.png"), _save(second, tmp_path, "b.png")]
    image_token = int(ckpt.model.config.image_token_id)
    model = LlavaModel(*pairs["f32"], EXACT)
    try:
        assert model.count_image_tokens(first) == (ckpt.model.config.vision_config.image_size // 14) ** 2
        chat = model.chat()
        answer = "".join(chat.send("What is in the picture?", paths[:1], GREEDY))
        messages: list[dict[str, Any]] = [{"role": "user", "content": _content("What is in the picture?", 1)}]
        ref_ids, ref_tokens = reference(ckpt, messages, [first])
        assert expanded_ids(chat.last_items, image_token) == ref_ids and chat.last_tokens == ref_tokens
        "".join(chat.send("And the other one?", paths[1:], GREEDY))
        messages += [{"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
                     {"role": "user", "content": _content("And the other one?", 1)}]
        ref_ids, ref_tokens = reference(ckpt, messages, [first, second])
        assert expanded_ids(chat.last_items, image_token) == ref_ids and chat.last_tokens == ref_tokens
    finally:
        model.close()


@pytest.mark.parametrize("mmproj_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("encoder", ["numpy", "ggml"])
def test_llava_interleave_features(interleave, mmproj_type: str, encoder: str) -> None:
    ckpt, pairs = interleave
    from llava_gguf.model import EncoderChoice, RuntimeOptions

    model = LlavaModel(*pairs[mmproj_type], RuntimeOptions(llama=EXACT.llama, encoder=EncoderChoice(encoder),
                                                           prompt_cache=False))
    try:
        for size in [(90, 50), (1, 1), (2000, 1500)]:
            image = random_image(*size, seed=size[0])
            pixels = ckpt.image_processor(images=[image], return_tensors="pt")
            with torch.no_grad():
                (expected,) = ckpt.model.model.get_image_features(**pixels).pooler_output
            expected = expected.reshape(-1, expected.shape[-1]).numpy()
            ours = model.image_features(image)
            # f16 / q8_0 files: the reference runs the unrounded f32 weights, so the file's rounding shows (measured
            # 7.7e-4 and 1.8e-2 of the scale; tests/test_siglip.py checks exactness on weights those files hold)
            bound = {"f32": 1e-4, "f16": 4e-3, "q8_0": 5e-2}[mmproj_type] * max(1.0, float(np.abs(expected).max()))
            assert ours.shape == expected.shape and np.abs(ours - expected).max() <= bound, size
    finally:
        model.close()


@pytest.fixture(scope="module")
def loaded(f32_pair) -> Any:
    cache: dict[tuple[str, str], tuple[Any, LlavaModel]] = {}

    def get(version: str, llm: str) -> tuple[Any, LlavaModel]:
        if (version, llm) not in cache:
            ckpt, llm_path, mmproj = f32_pair(version, "llava-hf", llm)
            cache[version, llm] = ckpt, LlavaModel(llm_path, mmproj, EXACT)
        return cache[version, llm]

    yield get
    for _, model in cache.values():
        model.close()


def _content(question: str, n_images: int) -> list[dict[str, str]]:
    return [{"type": "image"}] * n_images + [{"type": "text", "text": question}]


def reference(ckpt: Any, messages: list[dict[str, Any]], images: list[Image.Image]) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) of transformers' pipeline, the tokens cut where generation stops."""
    processor = AutoProcessor.from_pretrained(ckpt.path)
    if processor.chat_template is None:  # the Mistral LLaVA 1.5 fixture: llava-hf 1.5's template, as bakLlava-v1-hf's
        processor.chat_template = LLAVA15_HF
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    config = ckpt.model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else ckpt.tokenizer.eos_token_id
    return greedy(ckpt.model, inputs, eos if isinstance(eos, list) else [eos], N_NEW)


def greedy(model: Any, inputs: Any, eos: list[int], n_new: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) of ``model.generate`` on the processor's ``inputs``, cut where it stops."""
    eos = sorted(set(eos))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    ids = inputs["input_ids"][0].tolist()
    generated = out[0, len(ids):].tolist()
    stops = [i for i, token in enumerate(generated) if token in eos]
    return ids, generated[: stops[0]] if stops else generated


def expanded_ids(items: list[Any], image_token_id: int) -> list[int]:
    """Our prompt with each image's positions as the processor writes them (its image token, repeated)."""
    out: list[int] = []
    for item in items:
        out += [image_token_id] * item.n_tokens if isinstance(item, ImageSlot) else [item]
    return out


def _save(image: Image.Image, tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


@pytest.mark.parametrize(("version", "llm"), KINDS)
def test_one_and_two_images_and_a_second_turn(loaded, version: str, llm: str, tmp_path: Path) -> None:
    ckpt, model = loaded(version, llm)
    first, second = random_image(90, 50, seed=1), random_image(40, 70, seed=2)
    paths = [_save(first, tmp_path, "a.png"), _save(second, tmp_path, "b.png")]
    image_token = int(ckpt.model.config.image_token_id)

    chat = model.chat()
    answer = "".join(chat.send("What is in the picture?", paths[:1], GREEDY))
    messages: list[dict[str, Any]] = [{"role": "user", "content": _content("What is in the picture?", 1)}]
    ref_ids, ref_tokens = reference(ckpt, messages, [first])
    assert expanded_ids(chat.last_items, image_token) == ref_ids
    assert chat.last_tokens == ref_tokens

    # a second turn: the answer, then a new question about the same image
    "".join(chat.send("And its colour?", [], GREEDY))
    messages += [{"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
                 {"role": "user", "content": _content("And its colour?", 0)}]
    ref_ids, ref_tokens = reference(ckpt, messages, [first])
    assert expanded_ids(chat.last_items, image_token) == ref_ids
    assert chat.last_tokens == ref_tokens

    two = model.chat()
    "".join(two.send("What differs?", paths, GREEDY))
    ref_ids, ref_tokens = reference(ckpt, [{"role": "user", "content": _content("What differs?", 2)}], [first, second])
    assert expanded_ids(two.last_items, image_token) == ref_ids
    assert two.last_tokens == ref_tokens


@pytest.mark.parametrize(("version", "llm"), KINDS)
@pytest.mark.parametrize("size", [(90, 50), (1, 1), (33, 200), (400, 300)])
def test_image_features(loaded, version: str, llm: str, size: tuple[int, int]) -> None:
    """The packed features of transformers' pipeline (its image processor, tower and projector), within 1e-4."""
    ckpt, model = loaded(version, llm)
    image = random_image(*size, seed=size[0])
    processor = AutoProcessor.from_pretrained(ckpt.path)
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = ckpt.model.model.get_image_features(**pixels).pooler_output
    (expected,) = [f.reshape(-1, f.shape[-1]).numpy() for f in feats]
    ours = model.image_features(image)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_qwen2_answer_stops_at_im_end(tmp_path: Path) -> None:
    """<|im_end|> (generation_config's first eos id, not the tokenizer's <|endoftext|> config eos) ends the answer
    where transformers' generate stops: its output row becomes a copy of a token the answer would give at step 4,
    scaled up, so the reference stops early; ours must stop on the same token."""
    from checkpoints import build_family_checkpoint
    from safetensors.torch import load_file, save_file

    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    ckpt = build_family_checkpoint(tmp_path / "ckpt", family="qwen2")
    image = random_image(90, 50, seed=1)
    messages = [{"role": "user", "content": _content("What is in the picture?", 1)}]
    _, before = reference(ckpt, messages, [image])
    later = [t for t in before[3:] if t not in before[:3]]
    assert later, before
    im_end = ckpt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = ckpt.model.lm_head.weight
    with torch.no_grad():
        head[im_end] = head[later[0]] * 1.05
    weights = ckpt.path / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["language_model.lm_head.weight"] = head.detach().clone()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    ref_ids, ref_tokens = reference(ckpt, messages, [image])
    assert 0 < len(ref_tokens) < N_NEW, (before, ref_tokens)  # stopped by <|im_end|>, mid-answer

    result = convert_checkpoint(ckpt.path, tmp_path / "out", ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    model = LlavaModel(result.llm, result.mmproj, EXACT)
    try:
        chat = model.chat()
        "".join(chat.send("What is in the picture?", [_save(image, tmp_path, "a.png")], GREEDY))
        assert expanded_ids(chat.last_items, int(ckpt.model.config.image_token_id)) == ref_ids
        assert chat.last_tokens == ref_tokens
    finally:
        model.close()


def test_llava_interleave_in_batch_the_server_and_the_prompt_cache(interleave, tmp_path: Path) -> None:
    """The small LLaVAs run through every interface: a batch row, an OpenAI request to the real server on
    loopback and a later run restoring the image's prefix from the prompt cache all give the lone answer."""
    import base64

    from test_server import RunningServer

    from llava_gguf.batch import collect_tasks, run_batch
    from llava_gguf.model import RuntimeOptions
    from llava_gguf.server.service import ChatService, ServiceOptions

    ckpt, pairs = interleave
    path = _save(random_image(70, 40, seed=5), tmp_path, "photo.png")
    question = "What is in the picture?"
    lone = LlavaModel(*pairs["f32"], EXACT)
    try:
        chat = lone.chat()
        answer = "".join(chat.send(question, [path], GREEDY))
        tokens = chat.last_tokens
        (row,) = run_batch(lone, collect_tasks([path], [question]), GREEDY)
        assert row["tokens"] == tokens and row["answer"] == answer
    finally:
        lone.close()

    cached = RuntimeOptions(llama=EXACT.llama, encoder=EXACT.encoder, prompt_cache=True,
                            prompt_cache_dir=tmp_path / "prompts")
    for restored in (False, True):  # the first run saves the image's prefix, the second restores it
        model = LlavaModel(*pairs["f32"], cached)
        try:
            again = model.chat()
            assert "".join(again.send(question, [path], GREEDY)) == answer and again.last_tokens == tokens
            assert (model.timings.n_restored > 0) is restored
        finally:
            model.close()

    running = RunningServer(ChatService(LlavaModel(*pairs["f32"], EXACT), ServiceOptions(name="interleave")))
    try:
        url = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        reply = running.client().chat.completions.create(model="interleave", temperature=0, max_tokens=GREEDY.max_tokens,
                                                         messages=[{"role": "user", "content": [
                                                             {"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": question}]}])
        assert reply.choices[0].message.content == answer
    finally:
        running.stop()
        running.service.model.close()
