"""GGUF pairs made by llama.cpp's legacy LLaVA tools (as the Hub repos and ollama hold them) against the
original LLaVA code on the same weights: inferred settings, features, greedy answers, the inferred template."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from checkpoints import TinyCheckpoint
from legacy_gguf import write_legacy_llm, write_legacy_mmproj
from original_llava import OriginalLlava
from PIL import Image
from test_cli import EXACT_ARGS, QUESTION, json_of, one_error_line, run
from test_runtime import EXACT, GREEDY, random_image

from llava_gguf.errors import GGUFFormatError, ModelLoadError
from llava_gguf.llm.templates import Message, Role, Template, user_text
from llava_gguf.metadata import ImageMode, Layout, VisionSettings, read_gguf
from llava_gguf.model import LlavaModel, RuntimeOptions

# (LLaVA version, LLM, mmproj storage, key set, newline tensor name)
CASES = [
    pytest.param(("1.5", "llama", "f16", "old", None), id="1.5-f16-old"),
    pytest.param(("1.5", "llama", "f32", "new", None), id="1.5-f32-new"),
    pytest.param(("1.6", "llama", "f16", "old", "model.image_newline"), id="1.6-f16-old"),
    pytest.param(("1.6", "mistral", "f32", "new", "v.image_newline"), id="1.6-mistral-f32-new"),
    pytest.param(("1.6", "llama", "q8_0", "new", "model.image_newline"), id="1.6-q8_0-new"),
]


class Legacy:
    """A legacy pair of a tiny original-layout checkpoint, loaded, with the original code as reference."""

    def __init__(self, ckpt: TinyCheckpoint, out: Path, storage: str, key_set: str, newline: str | None) -> None:
        quant = gguf.GGMLQuantizationType.Q8_0 if storage == "q8_0" else None
        self.mmproj = write_legacy_mmproj(ckpt, out / "mmproj-model-f16.gguf", use_f32=storage == "f32",
                                          key_set=key_set, newline_name=newline or "model.image_newline", quant=quant)
        self.llm = write_legacy_llm(ckpt, out / "ggml-model-f32.gguf", out / "work")
        self.ckpt = ckpt
        self.model = LlavaModel(self.llm, self.mmproj, EXACT)
        self.original = OriginalLlava(ckpt)


@pytest.fixture(scope="module")
def legacy(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple, Legacy] = {}

    def make(case: tuple) -> Legacy:
        if case not in cache:
            version, llm, storage, key_set, newline = case
            ckpt = tiny_checkpoint(llava_version=version, layout="original", llm=llm,
                                   exact_in="q8_0" if storage == "q8_0" else "f16")
            cache[case] = Legacy(ckpt, tmp_path_factory.mktemp("legacy"), storage, key_set, newline)
        return cache[case]

    return make


@pytest.mark.parametrize("case", CASES)
def test_settings_are_inferred_as_the_original_code_uses_them(legacy, case) -> None:
    pair = legacy(case)
    settings = pair.model.settings
    version = case[0]
    assert settings.layout == Layout.ORIGINAL.value
    assert settings.llava_version == version
    assert settings.image_mode is (ImageMode.ANYRES if version == "1.6" else ImageMode.PAD)
    assert settings.follows_original_code
    assert settings.inferred
    assert pair.model.encoder.config.vision_feature_layer == 2  # all stored blocks: 3 layers, select -2
    assert pair.model.inference_note is not None and f"LLaVA {version}" in pair.model.inference_note


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size_wh", [(40, 30), (30, 50), (90, 50)])
def test_features_match_the_original_code(legacy, case, size_wh) -> None:
    pair = legacy(case)
    image = random_image(*size_wh, seed=sum(size_wh))
    ours = pair.model.image_features(image)
    ref = pair.original.image_features(image).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sizes", [[(40, 30)], [(56, 56), (30, 50)]], ids=["one-image", "two-images"])
def test_greedy_answer_matches_the_original_code(legacy, case, sizes) -> None:
    pair = legacy(case)
    images = [random_image(*wh, seed=7 + i) for i, wh in enumerate(sizes)]
    question = "What is in the picture?"
    chat = pair.model.chat()
    "".join(chat.send(question, images, GREEDY))
    expected = Template.MISTRAL_INSTRUCT if case[1] == "mistral" else Template.VICUNA_V1
    assert pair.model.template is expected
    assert chat.last_prompt == pair.model.render([Message(Role.USER, user_text(question, len(images)))])
    _, ref_tokens = pair.original.generate(chat.last_prompt, images)
    assert chat.last_tokens == ref_tokens


def test_overrides(legacy) -> None:
    pair = legacy(CASES[2].values[0])
    options = RuntimeOptions(llama=EXACT.llama, encoder=EXACT.encoder, template=Template.LLAVA_V1, llava_version="1.5")
    model = LlavaModel(pair.llm, pair.mmproj, options)
    assert model.template is Template.LLAVA_V1 and model.settings.image_mode is ImageMode.PAD
    assert "asked" in (model.inference_note or "")
    model.close()


def test_our_own_files_still_say_everything(tiny_checkpoint, tmp_path: Path) -> None:
    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    ckpt = tiny_checkpoint(llava_version="1.6", layout="original")
    result = convert_checkpoint(ckpt.path, tmp_path, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    settings = VisionSettings.read(read_gguf(result.mmproj))
    assert settings.inferred == ()
    model = LlavaModel(result.llm, result.mmproj, EXACT)
    assert model.inference_note is None
    model.close()


# ---------------------------------------------------------------- bad files


def _rewrite(src: Path, dest: Path, *, drop: tuple[str, ...] = (), add: dict | None = None) -> Path:
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in (add or {}).items()},
                           list(drop))
    return dest


def test_another_projector_type_is_one_line(legacy, tmp_path: Path) -> None:
    pair = legacy(CASES[1].values[0])
    ldp = _rewrite(pair.mmproj, tmp_path / "mmproj-ldp.gguf", add={"clip.projector_type": "ldp"})
    with pytest.raises(GGUFFormatError, match="projector is 'ldp', not LLaVA's MLP"):
        LlavaModel(pair.llm, ldp, EXACT)


def test_clip_without_projector_is_one_line(legacy, tmp_path: Path) -> None:
    pair = legacy(CASES[0].values[0])
    plain = _rewrite(pair.mmproj, tmp_path / "clip.gguf", drop=("clip.has_llava_projector",))
    with pytest.raises(GGUFFormatError, match="without a LLaVA projector"):
        VisionSettings.read(read_gguf(plain))


# ---------------------------------------------------------------- the template guess


@pytest.mark.parametrize(("metadata", "tokens", "hint", "expected"), [
    ({"general.name": "LLaMA v2", "llama.attention.head_count": "32", "llama.attention.head_count_kv": "32"},
     (), None, Template.VICUNA_V1),  # llava-v1.5-7b from llama.cpp's legacy converter
    ({"general.name": "LLaMA v2", "llama.attention.head_count": "32", "llama.attention.head_count_kv": "8",
      "llama.rope.freq_base": "1000000.0"}, (), None, Template.MISTRAL_INSTRUCT),  # llava-v1.6-mistral-7b
    ({"general.name": "LLaMA v2", "llama.attention.head_count": "56", "llama.attention.head_count_kv": "8",
      "llama.rope.freq_base": "5000000.0"}, ("<|im_start|>",), None, Template.CHATML_DIRECT),  # llava-v1.6-34b
    ({"general.name": "llava-v1.6-mistral-7b"}, (), None, Template.MISTRAL_INSTRUCT),
    ({"general.name": "llava-llama-2-13b-chat-lightning-preview"}, (), None, Template.LLAVA_LLAMA_2),
    ({"llama.attention.head_count": "4", "llama.attention.head_count_kv": "2"}, (), None, Template.VICUNA_V1),
    ({"tokenizer.chat_template": "{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"}, (), None,
     Template.MISTRAL_INSTRUCT),
    ({}, (), "{{ .System }}\nUSER: {{ .Prompt }}\nASSISTANT: ", Template.VICUNA_V1),  # ollama's llava:13b
    ({}, (), "[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]", Template.MISTRAL_INSTRUCT),
    ({}, (), "<|im_start|>system\n{{ .System }}<|im_end|>", Template.CHATML_DIRECT),
])
def test_template_guess(metadata, tokens, hint, expected) -> None:
    from llava_gguf.guess import guess_template

    guess = guess_template(metadata, set(tokens).__contains__, hint)
    assert guess.template is expected and guess.reason


# ---------------------------------------------------------------- the command line, ollama, the Hub

ONE_IMAGE = [(40, 30)]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    random_image(*ONE_IMAGE[0], seed=7).save(path)
    return path


def _cli_tokens(*args: str, env: dict[str, str] | None = None) -> dict:
    return json_of(run("ask", *args, *EXACT_ARGS, "--encoder", "numpy", "--temp", "0", "-n", "16", "--json", QUESTION,
                       env=env))


def test_cli_runs_a_legacy_pair_as_the_original_code(legacy, image_file: Path) -> None:
    pair = legacy(CASES[2].values[0])  # LLaVA 1.6 vicuna, f16 mmproj, old keys
    image = Image.open(image_file)
    _, reference = pair.original.generate(pair.model.render([Message(Role.USER, user_text(QUESTION, 1))]), [image])
    out = _cli_tokens("-m", str(pair.llm.parent), "-i", str(image_file))
    assert out["tokens"] == reference
    assert out["model"]["llava_version"] == "1.6" and out["model"]["template"] == "vicuna_v1"
    shown = run("ask", "-m", str(pair.llm.parent), "-i", str(image_file), *EXACT_ARGS, "--temp", "0", "-n", "4", QUESTION)
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.stderr.splitlines() if "template" in line)
    assert line.startswith("LLaVA 1.6 (anyres, original LLaVA rules), version from ")
    assert "vicuna_v1 template guessed from" in line and "--template / --llava-version" in line
    asked = _cli_tokens("-m", str(pair.llm.parent), "-i", str(image_file), "--template", "llava_v1",
                        "--llava-version", "1.5")
    assert asked["model"]["template"] == "llava_v1" and asked["model"]["llava_version"] == "1.5"
    assert asked["n_image_tokens"] == [16]  # a padded square of 4 x 4 patches, no tiles


def test_inspect_shows_what_was_inferred(legacy) -> None:
    pair = legacy(CASES[2].values[0])
    mmproj = json_of(run("inspect", "--json", str(pair.mmproj)))
    assert mmproj["llava"]["version"] == "1.6" and mmproj["llava"]["inferred"]
    assert "original LLaVA code" in mmproj["reference"]
    llm = json_of(run("inspect", "--json", str(pair.llm)))
    assert llm["template"].startswith("vicuna_v1 (guessed from")
    table = run("inspect", str(pair.mmproj))
    assert table.exit_code == 0 and "inferred" in table.stdout


def _ollama_store(root: Path, pair: Legacy, name: str, tag: str, template: str | None) -> Path:
    """A store laid out as ollama lays it out: blobs named by their sha256, a manifest per model:tag."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    contents = [("application/vnd.ollama.image.model", pair.llm.read_bytes()),
                ("application/vnd.ollama.image.projector", pair.mmproj.read_bytes()),
                ("application/vnd.ollama.image.params", b'{"stop": ["</s>", "USER:"]}')]
    if template is not None:
        contents.append(("application/vnd.ollama.image.template", template.encode()))
    for media, data in contents:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        layers.append({"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                   "size": 2}, "layers": layers}))
    return root


def test_ollama_models_by_name(legacy, image_file: Path, tmp_path: Path) -> None:
    pair = legacy(CASES[2].values[0])
    store = _ollama_store(tmp_path / "ollama", pair, "llava", "7b", "[INST] {{ .Prompt }} [/INST]")
    env = {"OLLAMA_MODELS": str(store)}
    out = _cli_tokens("-m", "ollama:llava:7b", "-i", str(image_file), env=env)
    assert out["model"]["llm"].startswith(str(store / "blobs" / "sha256-"))  # the blobs, in place
    assert out["model"]["template"] == "mistral_instruct" and "ollama's template" in out["model"]["inferred"]
    direct = _cli_tokens("--llm", str(pair.llm), "--mmproj", str(pair.mmproj), "-i", str(image_file),
                         "--template", "mistral_instruct")
    assert out["tokens"] == direct["tokens"] and out["prompt"] == direct["prompt"]
    assert _cli_tokens("-m", "ollama:LLaVA:7B", "-i", str(image_file), env=env)["tokens"] == out["tokens"]  # as ollama
    line = one_error_line(run("ask", "-m", "ollama:llava", "-i", str(image_file), QUESTION, env=env))
    assert "ollama:llava: no such model" in line and "installed: llava:7b" in line


def test_ollama_store_damage_is_one_line(legacy, image_file: Path, tmp_path: Path) -> None:
    pair = legacy(CASES[0].values[0])
    store = _ollama_store(tmp_path / "ollama", pair, "llava", "latest", None)
    env = {"OLLAMA_MODELS": str(store)}
    manifest = json.loads((store / "manifests/registry.ollama.ai/library/llava/latest").read_text())
    llm_blob = store / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")
    data = llm_blob.read_bytes()
    llm_blob.write_bytes(data[: len(data) // 2])  # an interrupted pull
    line = one_error_line(run("ask", "-m", "ollama:llava", "-i", str(image_file), QUESTION, env=env))
    assert f"holds {len(data) // 2} bytes, its manifest says {len(data)}" in line and "ollama pull llava" in line
    llm_blob.unlink()
    line = one_error_line(run("ask", "-m", "ollama:llava", "-i", str(image_file), QUESTION, env=env))
    assert f"blob {llm_blob.name}" in line and "is missing" in line


def test_community_hub_repo_from_the_cache(legacy, image_file: Path, tmp_path: Path, monkeypatch) -> None:
    """mys/ggml_llava-v1.5-7b's file names, in the Hugging Face cache, used offline: the default pick is
    the q4_k file (older llama.cpp's name for Q4_K_M) and the one mmproj."""
    from huggingface_hub import constants

    pair = legacy(CASES[0].values[0])
    snapshot = tmp_path / "hub" / "models--mys--ggml_llava-v1.5-7b" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("1" * 40)
    for src, name in ((pair.llm, "ggml-model-q4_k.gguf"), (pair.llm, "ggml-model-f16.gguf"),
                      (pair.mmproj, "mmproj-model-f16.gguf")):
        os.symlink(src, snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = _cli_tokens("-m", "mys/ggml_llava-v1.5-7b", "-i", str(image_file), env={"HF_HUB_OFFLINE": "1"})
    assert out["model"]["llm"].endswith("ggml-model-q4_k.gguf") and out["model"]["mmproj"].endswith("mmproj-model-f16.gguf")
    assert out["tokens"] == _cli_tokens("-m", str(pair.llm.parent), "-i", str(image_file))["tokens"]


def test_community_repo_file_names() -> None:
    from llava_gguf.sources import pick_gguf_files

    cmp_nct = ["ggml-mistral-7b-q_5_k.gguf", "mmproj-mistral7b-f16.gguf", "mmproj-mistral7b-f16-q6_k.gguf",
               "vicuna-7b-q5_k.gguf", "mmproj-vicuna7b-f16.gguf", "ggml-yi-34b-f16-q_3_k.gguf",
               "mmproj-llava-34b-f16-q6_k.gguf"]
    assert pick_gguf_files(cmp_nct, "q_3_k", "r") == ("ggml-yi-34b-f16-q_3_k.gguf", "mmproj-llava-34b-f16-q6_k.gguf")
    assert pick_gguf_files(cmp_nct, "vicuna-7b-q5_k.gguf", "r") == ("vicuna-7b-q5_k.gguf", "mmproj-vicuna7b-f16.gguf")
    assert pick_gguf_files(cmp_nct, "ggml-mistral-7b-q_5_k.gguf", "r")[1] == "mmproj-mistral7b-f16.gguf"
    with pytest.raises(ModelLoadError, match="2 LLM file.*--quant also takes a file's name"):
        pick_gguf_files(cmp_nct, "Q5_K", "r")
    cjpais = ["llava-v1.6-mistral-7b.Q3_K_XS.gguf", "llava-v1.6-mistral-7b.Q4_K_M.gguf", "mmproj-model-f16.gguf"]
    assert pick_gguf_files(cjpais, None, "r") == ("llava-v1.6-mistral-7b.Q4_K_M.gguf", "mmproj-model-f16.gguf")
    second_state = ["llava-v1.5-7b-Q5_K_M.gguf", "llava-v1.5-7b-Q4_K_M.gguf", "llava-v1.5-7b-mmproj-model-f16.gguf"]
    assert pick_gguf_files(second_state, "q5_k_m", "r") == ("llava-v1.5-7b-Q5_K_M.gguf",
                                                             "llava-v1.5-7b-mmproj-model-f16.gguf")


def test_bad_community_files_are_one_line(legacy, image_file: Path, tmp_path: Path) -> None:
    pair = legacy(CASES[0].values[0])
    ldp = _rewrite(pair.mmproj, tmp_path / "mmproj-ldp.gguf", add={"clip.projector_type": "ldp"})
    line = one_error_line(run("ask", "--llm", str(pair.llm), "--mmproj", str(ldp), "-i", str(image_file), QUESTION))
    assert "projector is 'ldp'" in line
    truncated = tmp_path / "mmproj-truncated.gguf"
    truncated.write_bytes(pair.mmproj.read_bytes()[:5000])
    line = one_error_line(run("ask", "--llm", str(pair.llm), "--mmproj", str(truncated), "-i", str(image_file), QUESTION))
    assert "mmproj-truncated.gguf" in line
    no_blocks = _edit_tensors(pair.mmproj, tmp_path / "mmproj-short.gguf",
                              lambda name, data: None if name == "v.blk.1.attn_q.weight" else data)
    line = one_error_line(run("ask", "--llm", str(pair.llm), "--mmproj", str(no_blocks), "-i", str(image_file), QUESTION))
    assert "not a complete LLaVA mmproj" in line and "v.blk.1.attn_q.weight" in line
    # a projector to width 32 for an LLM of width 64: the files do not belong together
    narrow = _edit_tensors(pair.mmproj, tmp_path / "mmproj-narrow.gguf",
                           lambda name, data: data[:32] if name.startswith("mm.2.") else data)
    line = one_error_line(run("ask", "--llm", str(pair.llm), "--mmproj", str(narrow), "-i", str(image_file), QUESTION))
    assert "width 32" in line and "width 64" in line and "do not belong together" in line


def _edit_tensors(src: Path, dest: Path, edit: Callable[[str, np.ndarray], np.ndarray | None]) -> Path:
    """A copy of an mmproj with each (unquantized) tensor passed through ``edit`` (None drops it)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, "clip")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = edit(t.name, np.asarray(t.data))
        if data is not None:
            writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_a_download_folder_and_the_python_api(legacy, image_file: Path, tmp_path: Path) -> None:
    """A folder as users download it (several LLM types; an mmproj whose name does not say so), through
    ``LlavaModel.load`` as through ``-m``; and an ollama name through the Python API."""
    pair = legacy(CASES[0].values[0])
    folder = tmp_path / "downloads"
    folder.mkdir()
    for src, name in ((pair.llm, "ggml-model-q4_k.gguf"), (pair.llm, "ggml-model-f16.gguf"),
                      (pair.mmproj, "llava-vision-encoder.gguf")):
        os.symlink(src, folder / name)
    model = LlavaModel.load(folder, EXACT)
    assert model.llm_path.name == "ggml-model-q4_k.gguf" and model.mmproj_path.name == "llava-vision-encoder.gguf"
    image = Image.open(image_file)
    answer = model.chat()
    "".join(answer.send(QUESTION, [image], GREEDY))
    assert answer.last_tokens == pair.original.generate(answer.last_prompt, [image])[1]
    model.close()
    store = _ollama_store(tmp_path / "ollama", pair, "llava", "13b", "USER: {{ .Prompt }} ASSISTANT:")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OLLAMA_MODELS", str(store))
        model = LlavaModel.load("ollama:llava:13b", EXACT)
    assert model.template is Template.VICUNA_V1 and "ollama's template" in (model.inference_note or "")
    model.close()


@pytest.mark.parametrize("case", CASES)
def test_the_ggml_encoder_reads_legacy_files_too(legacy, case) -> None:
    """Trimmed tower, swapped FFN names, the newline's old name, quantized types: through the same layout."""
    from llava_gguf.vision.choose import EncoderChoice

    pair = legacy(case)
    model = LlavaModel(pair.llm, pair.mmproj, RuntimeOptions(llama=EXACT.llama, encoder=EncoderChoice.GGML))
    image = random_image(90, 50, seed=5)
    assert model.encoder_name == "ggml"
    assert np.abs(model.image_features(image) - pair.original.image_features(image).numpy()).max() <= 1e-4
    model.close()
