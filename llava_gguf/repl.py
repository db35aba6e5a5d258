"""The interactive chat loop. It knows nothing about models: it reads lines through a function,
streams what a ``respond`` callback yields, and keeps the transcript for ``/save``.

Input: a line ending with ``\\`` continues on the next line; a line starting with ``\"\"\"`` opens a
block that ends with a line ending in ``\"\"\"``. Commands start with ``/`` (``/help`` lists them).
Ctrl-C during an answer stops it (at a piece boundary, so the backend stays consistent) and the
conversation goes on; Ctrl-C at the prompt drops the line; Ctrl-D (EOF) leaves.
"""

from __future__ import annotations

import json
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'

ReadLine = Callable[[str], str]  # input(): raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C
Respond = Callable[[str, Sequence[str]], Iterator[str]]  # (text, image paths) -> answer pieces
Stats = Callable[[], list[tuple[str, str]]]  # rows to show for /stats

HELP = [
    ("/image PATH...", "attach images to the next message"),
    ("/clear", "start a new conversation"),
    ("/save FILE", "write the transcript (.json: JSON, else Markdown)"),
    ("/stats", "timings and token counts of the last answer"),
    ("/help", "this list"),
    ("/exit", "leave (or Ctrl-D)"),
]


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    images: list[str] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class ChatLoop:
    """``run()`` until /exit or EOF. ``errors``: exception types to report and carry on after."""

    read_line: ReadLine
    respond: Respond
    console: Console
    on_clear: Callable[[], None] | None = None
    stats: Stats | None = None
    check_image: Callable[[str], None] | None = None  # raises one of ``errors`` for a bad image
    errors: tuple[type[Exception], ...] = ()
    transcript: list[Turn] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)

    def run(self) -> None:
        while True:
            try:
                text = self.read_message()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("^C")
                continue
            if not text.strip():
                continue
            if text.lstrip().startswith("/"):
                if not self.command(text.strip()):
                    return
                continue
            self.ask(text.strip())

    # ------------------------------------------------------------------ input

    def read_message(self) -> str:
        line = self.read_line(PROMPT)
        if line.lstrip().startswith(BLOCK):
            rest = line.lstrip()[len(BLOCK):]
            if rest.rstrip().endswith(BLOCK) and rest.strip():
                return rest.rstrip()[: -len(BLOCK)]
            lines = [rest] if rest.strip() else []
            while True:
                line = self.read_line(CONTINUATION)
                if line.rstrip().endswith(BLOCK):
                    lines.append(line.rstrip()[: -len(BLOCK)])
                    return "\n".join(lines).strip("\n")
                lines.append(line)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = self.read_line(CONTINUATION)
        lines.append(line)
        return "\n".join(lines)

    # ------------------------------------------------------------------ commands

    def command(self, line: str) -> bool:
        """Run a /command; False to leave."""
        try:
            name, *args = shlex.split(line)
        except ValueError as e:
            self.note(f"[red]{escape(str(e))}[/]")
            return True
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            for usage, what in HELP:
                self.console.print(f"  [bold]{escape(usage):<16}[/] {what}", highlight=False)
        elif name == "/image":
            self.attach(args)
        elif name == "/clear":
            self.transcript.clear()
            self.pending_images.clear()
            if self.on_clear is not None:
                self.on_clear()
            self.note("new conversation")
        elif name == "/save":
            if len(args) != 1:
                self.note("[red]usage: /save FILE[/]")
            else:
                self.save(Path(args[0]).expanduser())
        elif name == "/stats":
            rows = self.stats() if self.stats is not None else []
            if not rows:
                self.note("no answer yet")
            for label, value in rows:
                self.console.print(f"  {escape(label)}: {escape(value)}", highlight=False)
        else:
            self.note(f"[red]unknown command {escape(name)}[/]; /help lists them")
        return True

    def attach(self, paths: list[str]) -> None:
        if not paths:
            self.note("[red]usage: /image PATH...[/]")
            return
        for path in paths:
            try:
                if self.check_image is not None:
                    self.check_image(path)
            except self.errors as e:
                self.note(f"[red]{escape(str(e))}[/]")
                continue
            self.pending_images.append(path)
            self.note(f"attached {escape(path)}")

    def save(self, path: Path) -> None:
        if path.suffix.lower() == ".json":
            data: Any = {"messages": [
                {"role": t.role, "content": t.text, **({"images": t.images} if t.images else {}),
                 **({"interrupted": True} if t.interrupted else {})}
                for t in self.transcript
            ]}
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        else:
            text = transcript_markdown(self.transcript)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            self.note(f"[red]could not write {escape(str(path))}: {escape(e.strerror or str(e))}[/]")
            return
        self.note(f"saved {len(self.transcript)} messages to {escape(str(path))}")

    # ------------------------------------------------------------------ answers

    def ask(self, text: str) -> None:
        images, self.pending_images = self.pending_images, []
        pieces: list[str] = []
        interrupted = False
        out = self.console.file
        try:
            with stop_on_interrupt() as stop:
                stream = self.respond(text, images)
                try:
                    for piece in stream:
                        if stop.is_set():
                            stop.consumed()
                            interrupted = True
                            break
                        out.write(piece)
                        out.flush()
                        pieces.append(piece)
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
        except KeyboardInterrupt:
            interrupted = True
        except self.errors as e:
            if pieces:
                out.write("\n")
            self.note(f"[red]error:[/] {escape(str(e))}")
            self.pending_images = images  # still attached, for another try
            return
        answer = "".join(pieces)
        if pieces and not answer.endswith("\n"):
            out.write("\n")
        out.flush()
        if interrupted:
            self.note(escape("[interrupted]"))
        self.transcript += [Turn("user", text, images), Turn("assistant", answer.strip(), interrupted=interrupted)]

    def note(self, markup: str) -> None:
        self.console.print(markup, style="dim", highlight=False)


def transcript_markdown(turns: Sequence[Turn]) -> str:
    parts = ["# Chat\n"]
    for turn in turns:
        parts.append(f"## {'User' if turn.role == 'user' else 'Assistant'}\n")
        parts += [f"![image]({image})\n" for image in turn.images]
        parts.append(turn.text + ("\n\n*(interrupted)*" if turn.interrupted else "") + "\n")
    return "\n".join(parts)


class _Flag:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def consumed(self) -> None:
        """The caller is stopping: no KeyboardInterrupt after the grace period."""
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)


@contextmanager
def stop_on_interrupt(grace_s: float = 0.25) -> Iterator[_Flag]:
    """While inside, Ctrl-C sets the flag so the caller stops at its next step; if that step does not
    come within ``grace_s`` (a long image encode, a stream that yields nothing), or on a second
    Ctrl-C, KeyboardInterrupt is raised where the code is. Outside the main thread Ctrl-C is left alone."""
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, grace_s)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous_int = signal.signal(signal.SIGINT, on_interrupt)
    previous_alarm = signal.signal(signal.SIGALRM, on_alarm) if hasattr(signal, "SIGALRM") else None
    try:
        yield flag
    finally:
        if previous_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGINT, previous_int)


def enable_history(path: Path) -> Callable[[], None]:
    """Line editing and history with ``readline`` when Python has it; returns the function that saves."""
    try:
        import readline
    except ImportError:
        return lambda: None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    return save
