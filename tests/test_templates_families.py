"""The LLaVA family's other LLMs at run time: checkpoints' chat templates rendered as transformers renders them,
xtuner's llama3 / phi3 formats, the template guesses for other tools' Llama-3 and Phi-3 LLaVAs, and stopping on
every end-of-generation token the files name."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from legacy_gguf import LLAMA3_SPECIAL, llama3_tokenizer, write_family_llm, write_legacy_mmproj
from PIL import Image
from test_cli import EXACT_ARGS, json_of, one_error_line, run
from test_runtime import EXACT, GREEDY, random_image

from llava_gguf.guess import guess_template
from llava_gguf.llm.chat_template import render_chat_template
from llava_gguf.llm.templates import Message, Role, Template, render, user_text
from llava_gguf.metadata import LlavaKeys, TokenizeMode
from llava_gguf.model import GenerationOptions, LlavaModel

# ---------------------------------------------------------------- real-world chat templates

# meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# microsoft/Phi-3-mini-4k-instruct's (the first release, with its BOS)
PHI3_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|system|>' + '\n' + message['content'] + '<|end|>' + '\n'}}{% elif (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif message['role'] == 'assistant' %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
# llava-hf/llava-1.5-7b-hf's chat_template.json
LLAVA15_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llama3-llava-next-8b-hf's chat_template.json
LLAMA3_LLAVA_NEXT = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] | trim + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {"llama3-instruct": LLAMA3_INSTRUCT, "phi3-instruct": PHI3_INSTRUCT, "llava-1.5-hf": LLAVA15_HF,
             "llama3-llava-next": LLAMA3_LLAVA_NEXT}
MULTIMODAL = {"llava-1.5-hf", "llama3-llava-next"}

Q1, Q2, A1 = "What is in the picture?", "And what colour is it?", "A cat on a mat."
# (system, [(role, text, n_images)]) as the runtime holds a conversation
CONVERSATIONS = {
    "one-image": (None, [(Role.USER, Q1, 1)]),
    "two-images": (None, [(Role.USER, Q1, 2)]),
    "system": ("You are a careful assistant.", [(Role.USER, Q1, 1)]),
    "second-turn": (None, [(Role.USER, Q1, 1), (Role.ASSISTANT, A1, 0), (Role.USER, Q2, 0)]),
}


def _messages(turns: list[tuple[Role, str, int]]) -> list[Message]:
    return [Message(role, user_text(text, n) if role is Role.USER else text) for role, text, n in turns]


def _transformers_messages(system: str | None, turns: list[tuple[Role, str, int]], multimodal: bool) -> list[dict]:
    """The conversation as a transformers user writes it for that template."""
    out: list[dict] = []
    if system:
        out.append({"role": "system", "content": [{"type": "text", "text": system}] if multimodal else system})
    for role, text, n in turns:
        if multimodal:
            out.append({"role": role.value, "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]})
        else:
            out.append({"role": role.value, "content": "<image>\n" * n + text})
    return out


def _hf_tokenizer(chat_template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=llama3_tokenizer(("<image>",)), bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=chat_template)


def _processor(chat_template: str):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=_hf_tokenizer(chat_template), patch_size=14,
                          vision_feature_select_strategy="default", chat_template=chat_template)


SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_checkpoint_template_renders_as_transformers(name: str, conversation: str) -> None:
    system, turns = CONVERSATIONS[conversation]
    source = TEMPLATES[name]
    multimodal = name in MULTIMODAL
    hf = _transformers_messages(system, turns, multimodal)
    if multimodal:  # the processor's apply_chat_template, as llava-hf's model cards call it
        expected = _processor(source).apply_chat_template(hf, add_generation_prompt=True)
    else:
        expected = _hf_tokenizer(source).apply_chat_template(hf, add_generation_prompt=True, tokenize=False)
    ours = render_chat_template(source, _messages(turns), system, SPECIAL)
    assert ours == expected
    assert ours.count("<image>") == sum(n for _, _, n in turns)


def test_transformers_extras_and_errors() -> None:
    from llava_gguf.errors import PromptError

    extras = ("{{ raise_exception('no') if messages | length > 9 }}{{ messages[0]['content'] | tojson }}"
              "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
              "{{ strftime_now('%Y') | length }}{{ dict(a=1)['a'] }}")
    message = [Message(Role.USER, "é \"<b>\"")]
    expected = _hf_tokenizer(extras).apply_chat_template([{"role": "user", "content": "é \"<b>\""}], tokenize=False,
                                                         add_generation_prompt=True)
    assert render_chat_template(extras, message, None, SPECIAL) == expected == '"é \\"<b>\\""141'
    with pytest.raises(PromptError, match="refused the conversation: only users"):
        render_chat_template("{{ raise_exception('only users') }}", message, None, SPECIAL)
    with pytest.raises(PromptError, match="does not compile"):
        render_chat_template("{% for %}", message, None, SPECIAL)
    with pytest.raises(PromptError):  # the sandbox
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", message, None,
                             SPECIAL)


# ---------------------------------------------------------------- xtuner's formats

# xtuner/utils/templates.py, PROMPT_TEMPLATE (the fields its chat loop reads)
XTUNER = {
    Template.LLAMA3: {"SYSTEM": "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                      "INSTRUCTION": "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                                     "<|start_header_id|>assistant<|end_header_id|>\n\n",
                      "SUFFIX": "<|eot_id|>", "SEP": ""},
    Template.PHI3: {"SYSTEM": "<|system|>\n{system}<|end|>\n",
                    "INSTRUCTION": "<|user|>\n{input}<|end|>\n<|assistant|>\n", "SUFFIX": "<|end|>", "SEP": "\n"},
}


def _xtuner_prompt(template: Template, system: str | None, turns: list[tuple[Role, str, int]]) -> str:
    """xtuner's chat loop: SYSTEM on the first turn, INSTRUCTION per question (the image line before it),
    each answer followed by its SUFFIX (the stop word, decoded with the answer) and SEP."""
    t = XTUNER[template]
    out = t["SYSTEM"].format(system=system) if system else ""
    for role, text, n in turns:
        if role is Role.USER:
            out += t["INSTRUCTION"].format(input="<image>\n" * n + text)
        else:
            out += text + t["SUFFIX"] + t["SEP"]
    return out


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("template", [Template.LLAMA3, Template.PHI3])
def test_builtin_llama3_and_phi3_are_xtuners(template: Template, conversation: str) -> None:
    system, turns = CONVERSATIONS[conversation]
    assert render(template, _messages(turns), system) == _xtuner_prompt(template, system, turns)


# ---------------------------------------------------------------- guesses

# ollama's llava-llama3 and llava-phi3 template layers
OLLAMA_LLAVA_LLAMA3 = ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
                       "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>")
OLLAMA_LLAVA_PHI3 = ("{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n"
                     "{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>")
OLLAMA_BAKLLAVA = "{{ .System }}\nUSER: {{ .Prompt }}\nASSISTANT:"


@pytest.mark.parametrize(("metadata", "tokens", "hint", "expected", "evidence"), [
    ({}, (), OLLAMA_LLAVA_LLAMA3, Template.LLAMA3, "ollama's template"),
    ({}, (), OLLAMA_LLAVA_PHI3, Template.PHI3, "ollama's template"),
    ({"tokenizer.chat_template": LLAMA3_INSTRUCT}, (), None, Template.LLAMA3, "the GGUF's chat template"),
    ({"tokenizer.chat_template": PHI3_INSTRUCT}, (), None, Template.PHI3, "the GGUF's chat template"),
    ({"general.name": "LLaMA v2"}, LLAMA3_SPECIAL, None, Template.LLAMA3, "in the vocabulary"),
    ({"general.name": "LLaMA v2"}, ("<|user|>", "<|end|>"), None, Template.PHI3, "in the vocabulary"),
    ({"general.architecture": "phi3"}, (), None, Template.PHI3, "phi3 LLM"),
    # bakllava: Mistral 7B v0.1's shape (GQA, RoPE base 10000), LLaVA 1.5's USER/ASSISTANT
    ({}, (), OLLAMA_BAKLLAVA, Template.VICUNA_V1, "ollama's template"),
    ({"general.name": "BakLLaVA-1", "llama.attention.head_count": "32", "llama.attention.head_count_kv": "8",
      "llama.rope.freq_base": "10000.0"}, (), None, Template.VICUNA_V1, "BakLLaVA"),
    ({"general.name": "LLaMA v2", "llama.attention.head_count": "32", "llama.attention.head_count_kv": "8",
      "llama.rope.freq_base": "10000.0"}, (), None, Template.VICUNA_V1, "Llama-2-shaped"),
])
def test_family_guesses(metadata, tokens, hint, expected, evidence) -> None:
    guess = guess_template(metadata, set(tokens).__contains__, hint)
    assert guess.template is expected and evidence in guess.reason


# ---------------------------------------------------------------- legacy Llama-3 / Phi-3 pairs at run time


class FamilyPair:
    def __init__(self, root: Path, family: str, mmproj: Path, spm_source: Path, **options) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.mmproj = root / "mmproj-model-f16.gguf"
        if not self.mmproj.exists():
            self.mmproj.symlink_to(mmproj)
        self.llm = write_family_llm(root / f"llava-{family}-f32.gguf", family, 64, spm_source=spm_source, **options)


@pytest.fixture(scope="module")
def family_pair(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    from legacy_gguf import write_legacy_llm

    work = tmp_path_factory.mktemp("families")
    ckpt = tiny_checkpoint(llava_version="1.5", layout="original")
    mmproj = write_legacy_mmproj(ckpt, work / "mmproj.gguf")
    spm = write_legacy_llm(ckpt, work / "llama.gguf", work / "convert")
    counter = iter(range(1000))

    def make(family: str, **options) -> FamilyPair:
        return FamilyPair(work / f"{family}-{next(counter)}", family, mmproj, spm, **options)

    return make


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    random_image(40, 30, seed=7).save(path)
    return path


@pytest.mark.parametrize(("family", "stop", "answer"), [("llama3", "<|eot_id|>", " the"), ("phi3", "<|end|>", " the")])
def test_a_legacy_pair_stops_at_its_end_of_turn(family_pair, family: str, stop: str, answer: str) -> None:
    pair = family_pair(family)
    model = LlavaModel(pair.llm, pair.mmproj, EXACT)
    template = Template.LLAMA3 if family == "llama3" else Template.PHI3
    assert model.template is template
    assert f"{template.value} template guessed from" in (model.inference_note or "")
    assert model.settings.llava_version == "1.5" and model.settings.image_mode.value == "pad"  # xtuner's inference
    stop_id = model.runtime.tokenize(stop, add_bos=False, special=True)
    assert len(stop_id) == 1 and model.is_end_of_generation(stop_id[0])
    chat = model.chat()
    text = "".join(chat.send("What is in the picture?", [random_image(40, 30, seed=1)], GREEDY))
    assert text.strip() == answer.strip() and len(chat.last_tokens) == 1  # one token, then the end of turn ends it
    assert chat.last_prompt == render(template, [Message(Role.USER, user_text("What is in the picture?", 1))])
    assert chat.last_items[0] == model.runtime.bos and chat.last_items[1] != model.runtime.bos  # xtuner: encode(chunk)
    # a second turn renders the answer with its end of turn, as xtuner's chat loop does
    "".join(chat.send("And then?", [], GREEDY))
    assert f"{answer.strip()}{stop}" in chat.last_prompt
    model.close()


def test_eos_token_ids_end_answers_too(family_pair) -> None:
    """An id in llava_gguf.eos_token_ids ends an answer even where llama.cpp does not (here the answer's own
    token): in ask/chat and in the scheduler (serve, batch --parallel)."""
    from llava_gguf.llm.scheduler import Request

    probe = family_pair("llama3")
    model = LlavaModel(probe.llm, probe.mmproj, EXACT)
    cat = model.runtime.tokenize(" the", add_bos=False, special=True)
    assert len(cat) == 1 and not model.is_end_of_generation(cat[0])
    model.close()
    pair = family_pair("llama3", eos_token_ids=cat)
    model = LlavaModel(pair.llm, pair.mmproj, EXACT)
    assert model.end_token_ids == frozenset(cat) and model.is_end_of_generation(cat[0])
    chat = model.chat()
    assert "".join(chat.send("What is in the picture?", [random_image(40, 30, seed=1)], GREEDY)) == ""
    assert chat.last_tokens == [] and model.timings.n_generated == 0
    turn = model.chat().prepare("Hi?", [random_image(40, 30, seed=1)])
    scheduler = model.scheduler(2)
    try:
        tickets = [scheduler.submit(Request(turn.items, GREEDY, model.feature_source(turn.views))) for _ in range(2)]
        assert [t.wait(timeout=300).tokens for t in tickets] == [[], []]
    finally:
        scheduler.close()
    model.close()


def test_checkpoint_template_from_the_file(family_pair, image_file: Path) -> None:
    """A file that carries a chat template: ``--template checkpoint`` renders it as transformers does, and the
    BOS it writes is not doubled (transformers' processor: add_special_tokens=False then)."""
    pair = family_pair("llama3", chat_template=LLAMA3_INSTRUCT)
    out = json_of(run("ask", "--llm", str(pair.llm), "--mmproj", str(pair.mmproj), "-i", str(image_file),
                      *EXACT_ARGS, "--temp", "0", "-n", "4", "--json", "--template", "checkpoint", "Hi?"))
    assert out["model"]["template"] == "checkpoint"
    expected = _hf_tokenizer(LLAMA3_INSTRUCT).apply_chat_template(
        [{"role": "user", "content": "<image>\nHi?"}], add_generation_prompt=True, tokenize=False)
    assert out["prompt"] == expected and expected.startswith("<|begin_of_text|>")
    model = LlavaModel(pair.llm, pair.mmproj, EXACT)
    bos = model.runtime.bos
    chat = model.chat()
    "".join(chat.send("Hi?", [Image.open(image_file)], GenerationOptions(max_tokens=2)))
    assert chat.last_items[0] == bos and chat.last_items[1] != bos
    model.close()
    # the guess reads the same template: llama3
    assert "llama3 template guessed from <|start_header_id|> in the GGUF's chat template" in run(
        "ask", "--llm", str(pair.llm), "--mmproj", str(pair.mmproj), "-i", str(image_file), *EXACT_ARGS, "-n", "1",
        "Hi?").stderr


def test_template_checkpoint_without_a_chat_template_is_one_line(family_pair, image_file: Path) -> None:
    pair = family_pair("phi3")
    line = one_error_line(run("ask", "--llm", str(pair.llm), "--mmproj", str(pair.mmproj), "-i", str(image_file),
                              "--template", "checkpoint", "Hi?"))
    assert "carries no chat template" in line and pair.llm.name in line


def test_prompt_ids_equal_the_processors(family_pair, image_file: Path) -> None:
    """A converted llava-hf Llama-3 file (Template.CHECKPOINT, <image> a special token, whole-prompt
    tokenization): the prompt's ids equal LlavaProcessor.apply_chat_template(tokenize=True)'s, image tokens
    collapsed to one each, for one image, two images and a second turn."""
    tok = llama3_tokenizer(("<image>",))
    image_id = tok.token_to_id("<image>")
    pair = family_pair("llama3", chat_template=LLAMA3_LLAVA_NEXT, extra_special=("<image>",),
                       eos_token_ids=[tok.token_to_id("<|eot_id|>")],
                       keys={LlavaKeys.TEMPLATE: Template.CHECKPOINT.value, LlavaKeys.IMAGE_TOKEN_ID: image_id,
                             LlavaKeys.TOKENIZE_MODE: TokenizeMode.WHOLE.value})
    model = LlavaModel(pair.llm, pair.mmproj, EXACT)
    assert model.template is Template.CHECKPOINT and model.template_guess is None
    processor = _processor(LLAMA3_LLAVA_NEXT)
    image = Image.open(image_file).convert("RGB")
    for system, turns in CONVERSATIONS.values():
        chat = model.chat(system)
        images = [image] * turns[0][2]
        hf = _transformers_messages(system, turns, True)
        for message in hf:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part["type"] == "image":
                    part["image"] = image
        if len(turns) > 1:
            chat.messages = _messages(turns[:2])
            chat.images = [model.prepare_image(image)]
            images = []
        list(chat.send(turns[-1][1], images, GenerationOptions(max_tokens=1)))
        ours = [image_id if not isinstance(i, int) else i for i in chat.last_items]
        encoded = processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = list(np.asarray(encoded["input_ids"]).reshape(-1))
        collapsed = [t for k, t in enumerate(ids) if t != image_id or k == 0 or ids[k - 1] != image_id]
        assert ours == collapsed
    model.close()


def test_inspect_shows_the_llm_and_the_templates_source(family_pair) -> None:
    pair = family_pair("llama3")
    info = json_of(run("inspect", "--json", str(pair.llm)))
    assert info["architecture"] == "llama" and info["tokenizer"]["model"] == "gpt2"
    assert info["tokenizer"]["pre"] == "llama-bpe"
    assert info["template"].startswith("llama3 (guessed from") and "vocabulary" in info["template_source"]
    table = "".join(run("inspect", str(pair.llm)).stdout.split())  # rich wraps the table to the terminal
    assert "llama,tokenizergpt2(pre-tokenizerllama-bpe)" in table and "llama3(guessedfrom<|start_header_id|>" in table
    phi3 = family_pair("phi3", chat_template=PHI3_INSTRUCT, keys={LlavaKeys.TEMPLATE: "checkpoint"})
    info = json_of(run("inspect", "--json", str(phi3.llm)))
    assert info["architecture"] == "phi3" and info["tokenizer"]["model"] == "llama"
    assert info["template"] == "checkpoint" and "chat template" in info["template_source"]
    assert gguf.Keys.Tokenizer.CHAT_TEMPLATE in info["template_source"]


def test_phi3_strips_the_whitespace_after_special_tokens_whatever_its_name(family_pair) -> None:
    """Phi-3's tokenizer strips the whitespace after its special tokens (but <s>, <unk>, <|endoftext|>);
    llama.cpp does so only for files named phi-3 / phi3. Every phi3 file tokenizes as llama.cpp's own rule
    does on a file so named (these files have no <image> token, the one special token it would get wrong)."""
    import llama_cpp
    from llama_cpp import _internals

    from llava_gguf.llm.llama import LlamaRuntime

    prompt = render(Template.PHI3, _messages(CONVERSATIONS["second-turn"][1]), "Be brief.")
    named_path, other_path = family_pair("phi3", name="Phi3").llm, family_pair("phi3").llm
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    vocabularies = [_internals.LlamaModel(path_model=str(p), params=params, verbose=False)
                    for p in (named_path, other_path)]
    llama_cpp_rule, no_rule = vocabularies  # llama.cpp's own rule applies to the first only
    expected = llama_cpp_rule.tokenize(prompt.encode(), add_bos=True, special=True)
    assert no_rule.tokenize(prompt.encode(), add_bos=True, special=True) != expected
    named, other = LlamaRuntime(named_path, EXACT.llama), LlamaRuntime(other_path, EXACT.llama)
    assert other.tokenize(prompt, add_bos=True) == named.tokenize(prompt, add_bos=True) == expected
    assert other.tokenize("<|endoftext|> x", add_bos=False) == llama_cpp_rule.tokenize(
        b"<|endoftext|> x", add_bos=False, special=True)
    for runtime in (named, other, *vocabularies):
        runtime.close()


def test_the_server_and_batch_stop_there_too(family_pair, image_file: Path) -> None:
    """The server's requests and batch rows end at the end of turn as ask does: one token, finish "stop"."""
    import base64
    import threading

    from llava_gguf.batch import collect_tasks, run_batch
    from llava_gguf.server.protocol import ChatCompletionRequest
    from llava_gguf.server.service import ChatService, ServiceOptions

    pair = family_pair("phi3")
    model = LlavaModel(pair.llm, pair.mmproj, EXACT)
    service = ChatService(model, ServiceOptions(name="phi3"))
    url = "data:image/png;base64," + base64.b64encode(image_file.read_bytes()).decode()
    request = ChatCompletionRequest.model_validate({"temperature": 0, "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi?"}]}]})
    result = service.run(service.parse(request), lambda piece: None, threading.Event())
    assert result.text.strip() == "the" and result.finish_reason == "stop" and result.usage["completion_tokens"] == 1
    rows = list(run_batch(model, collect_tasks([image_file], ["Hi?"]), GREEDY))
    assert [(row["answer"].strip(), row["n_generated"]) for row in rows] == [("the", 1)]
    model.close()
