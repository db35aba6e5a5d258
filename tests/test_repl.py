"""The chat loop with scripted input and a fake backend, then `llava-gguf chat` in a real terminal."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pexpect
import pytest
from checkpoints import TinyCheckpoint
from conftest import seed_probe_cache
from rich.console import Console
from test_runtime import random_image

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.llm.llama import KVCacheType, LlamaOptions
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.model import GenerationOptions, LlavaModel, RuntimeOptions
from llava_gguf.repl import ChatLoop

# ---------------------------------------------------------------- the loop, model-agnostic


class BadImage(Exception):
    pass


def scripted(lines: list[str | type[BaseException]]) -> Callable[[str], str]:
    """input(): echoes prompt and line like a terminal; EOFError when the script ends."""
    queue = list(lines)

    def read_line(prompt: str) -> str:
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, type):
            raise item()
        console.file.write(f"{prompt}{item}\n")
        return item

    console = Console(file=io.StringIO(), width=120, color_system=None, highlight=False)
    read_line.console = console  # type: ignore[attr-defined]
    return read_line


def test_loop_transcript(tmp_path: Path) -> None:
    calls: list[tuple[str, list[str]]] = []
    cleared: list[bool] = []

    def respond(text: str, images: Sequence[str]) -> Iterator[str]:
        calls.append((text, list(images)))
        if text == "fail":
            raise BadImage("the prompt does not fit")
        if text == "long":
            yield "one "
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the loop stops after this piece
            yield "two "
            yield "three"
            return
        if text == "hard stop":
            yield "half"
            raise KeyboardInterrupt  # a second Ctrl-C, inside the backend
        yield f"echo {text!r}"
        yield f" with {len(images)} image(s)"

    def check_image(path: str) -> None:
        if "bad" in path:
            raise BadImage(f"{path}: not an image file")

    md, js = tmp_path / "t.md", tmp_path / "t.json"
    read_line = scripted([
        "/help",
        "/image cat.png bad.png 'my dog.jpg'",
        "What is this?",
        "second \\",
        "line",
        '"""',
        "a block",
        'of text"""',
        KeyboardInterrupt,
        "/stats",
        "/image x.png",
        "fail",
        "long",
        "hard stop",
        f"/save {md}",
        f"/save {js}",
        "/nope",
        "/clear",
        "after clear",
        "/exit",
        "never read",
    ])
    console: Console = read_line.console  # type: ignore[attr-defined]
    loop = ChatLoop(read_line=read_line, respond=respond, console=console, on_clear=lambda: cleared.append(True),
                    stats=lambda: [("generated tokens", "12")], check_image=check_image, errors=(BadImage,))
    loop.run()
    assert console.file.getvalue() == f"""\
>>> /help
  /image PATH...   attach images to the next message
  /clear           start a new conversation
  /save FILE       write the transcript (.json: JSON, else Markdown)
  /stats           timings and token counts of the last answer
  /help            this list
  /exit            leave (or Ctrl-D)
>>> /image cat.png bad.png 'my dog.jpg'
attached cat.png
bad.png: not an image file
attached my dog.jpg
>>> What is this?
echo 'What is this?' with 2 image(s)
>>> second \\
... line
echo 'second \\nline' with 0 image(s)
>>> \"\"\"
... a block
... of text\"\"\"
echo 'a block\\nof text' with 0 image(s)
^C
>>> /stats
  generated tokens: 12
>>> /image x.png
attached x.png
>>> fail
error: the prompt does not fit
>>> long
one 
[interrupted]
>>> hard stop
half
[interrupted]
>>> /save {md}
saved 10 messages to {md}
>>> /save {js}
saved 10 messages to {js}
>>> /nope
unknown command /nope; /help lists them
>>> /clear
new conversation
>>> after clear
echo 'after clear' with 0 image(s)
>>> /exit
"""
    # the failed message kept its image for the next one
    assert calls[3:5] == [("fail", ["x.png"]), ("long", ["x.png"])]
    assert cleared == [True]
    assert loop.transcript[0].text == "after clear"
    saved = json.loads(js.read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] * 5
    assert saved[0] == {"role": "user", "content": "What is this?", "images": ["cat.png", "my dog.jpg"]}
    assert saved[7] == {"role": "assistant", "content": "one", "interrupted": True}
    assert saved[9] == {"role": "assistant", "content": "half", "interrupted": True}
    markdown = md.read_text()
    assert markdown.startswith("# Chat\n\n## User\n\n![image](cat.png)\n\n![image](my dog.jpg)\n\nWhat is this?\n")
    assert "## Assistant\n\necho 'What is this?' with 2 image(s)\n" in markdown
    assert "one\n\n*(interrupted)*" in markdown


def test_loop_ends_on_eof() -> None:
    read_line = scripted(["hello"])
    console: Console = read_line.console  # type: ignore[attr-defined]
    ChatLoop(read_line=read_line, respond=lambda text, images: iter(["hi"]), console=console).run()
    assert console.file.getvalue() == ">>> hello\nhi\n\n"


# ---------------------------------------------------------------- llava-gguf chat in a pseudo-terminal

EXACT_ARGS = ["--kv-cache-type", "f32", "--flash-attn", "off", "-t", "1"]
EXACT = RuntimeOptions(llama=LlamaOptions(kv_cache_type=KVCacheType.F32, flash_attn=False, n_threads=1))
PROMPT = re.compile(r"\n>>> ")


@pytest.fixture(scope="module")
def gguf_dir(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tiny_checkpoint(llava_version="1.5", layout="llava-hf", llm="llama")
    out = tmp_path_factory.mktemp("chat-gguf")
    convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    return out


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "cat.png"
    random_image(90, 50, seed=1).save(path)
    return path


def spawn_chat(args: list[str], tmp_path: Path) -> tuple[pexpect.spawn, io.StringIO]:
    seed_probe_cache(tmp_path / "cache")
    env = {**os.environ, "LLAVA_GGUF_CACHE": str(tmp_path / "cache"), "TERM": "dumb", "COLUMNS": "200",
           "NO_COLOR": "1"}
    env.pop("LLAVA_GGUF_MODEL", None)
    log = io.StringIO()
    child = pexpect.spawn(sys.executable, ["-m", "llava_gguf.cli", "chat", *args], env=env, encoding="utf-8",
                          timeout=60, dimensions=(50, 200), cwd=str(tmp_path))
    child.logfile_read = log
    return child, log


def plain(text: str) -> str:
    return text.replace("\r", "")


def test_chat_session(gguf_dir: Path, image: Path, tmp_path: Path) -> None:
    q1, q2 = "What is in the picture?", "And what colour is it?"
    options = GenerationOptions(24, sampling=SamplingOptions(temperature=1.0, seed=3))
    model = LlavaModel.load(gguf_dir, EXACT)
    chat = model.chat()
    a1 = "".join(chat.send(q1, [image], options))
    a2 = "".join(chat.send(q2, [], options))
    model.close()

    child, log = spawn_chat(["-m", str(gguf_dir), "-n", "24", "--temp", "1", "--seed", "3", *EXACT_ARGS], tmp_path)
    child.expect("/help for commands")
    child.expect(">>> ")
    child.sendline(f"/image {image}")
    child.expect(f"attached {re.escape(str(image))}")
    child.expect(PROMPT)
    child.sendline(q1)
    child.expect(PROMPT)
    first = plain(child.before)
    child.sendline(q2)
    child.expect(PROMPT)
    second = plain(child.before)
    child.sendline("/stats")
    child.expect(PROMPT)
    stats = plain(child.before)
    child.sendline("/save transcript.md")
    child.expect("saved 4 messages to transcript.md")
    child.expect(PROMPT)
    child.sendline("/clear")
    child.expect("new conversation")
    child.expect(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, plain(log.getvalue())

    assert q1 in first and "encoding image 1" in first and a1.strip() in first
    assert q2 in second and "encoding image" not in second and a2.strip() in second
    assert "images encoded: 0" in stats  # the second question reused the image's features
    assert "generated tokens: " in stats and "image tokens: none" in stats
    transcript = (tmp_path / "transcript.md").read_text()
    assert f"## User\n\n![image]({image})\n\n{q1}\n" in transcript
    assert f"## User\n\n{q2}\n" in transcript
    assert a1.strip() in transcript and a2.strip() in transcript


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_conversation(gguf_dir: Path, image: Path,
                                                                   tmp_path: Path) -> None:
    # -c above the tiny model's trained 4096: room for two 4000-token answers
    child, log = spawn_chat(["-m", str(gguf_dir), "-i", str(image), "-n", "4000", "--temp", "1", "--seed", "1",
                             "-c", "10000", *EXACT_ARGS], tmp_path)
    child.expect(">>> ")
    child.sendline("Tell me a long story about the picture.")
    child.expect("tiles")  # the encoding bar closes as the first piece of the answer arrives
    child.sendcontrol("c")
    child.expect(r"\[interrupted\]")
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect(PROMPT)
    stats = plain(child.before)
    generated = int(re.search(r"generated tokens: (\d+)", stats).group(1))
    assert generated < 4000  # stopped early (counted tokens: the stop may come after the first piece)
    assert "images encoded: 1" in stats
    first_prompt = int(re.search(r"prompt tokens: (\d+)", stats).group(1))
    child.sendline("Go on.")
    child.expect("Go on.")
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect(PROMPT)
    stats = plain(child.before)
    assert "images encoded: 0" in stats
    prompt_tokens = int(re.search(r"prompt tokens: (\d+)", stats).group(1))
    assert prompt_tokens > first_prompt  # the first, interrupted, turn is part of the conversation
    child.sendline("/save t.json")
    child.expect(PROMPT)
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, plain(log.getvalue())
    assert "error" not in plain(log.getvalue())
    messages = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[0]["images"] == [str(image)]
    assert messages[1]["interrupted"] and "interrupted" not in messages[3]
