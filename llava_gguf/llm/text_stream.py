"""Generated tokens to text pieces: whole UTF-8 characters only (a character's bytes may be split across
tokens), cut before the first stop string, and nothing handed out that a stop string could still take
back (the last ``len(longest stop) - 1`` characters wait for the next token). One answer's stream, used
alike by a lone generation (``LlavaModel.stream_text``) and by the scheduler's sequences."""

from __future__ import annotations

import codecs
from collections.abc import Callable


class TextStream:
    def __init__(self, token_bytes: Callable[[int], bytes], stop: tuple[str, ...] = ()) -> None:
        self._token_bytes = token_bytes
        self._stop = stop
        self._hold = max(0, max((len(s) for s in stop), default=0) - 1)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of ``text`` handed out
        self.stopped = False  # a stop string was found: the answer ends before it

    def push(self, token: int) -> str:
        """Add one generated token; the text that is now safe to hand out ("" when none)."""
        self.text += self._decoder.decode(self._token_bytes(token))
        found = [i for i in (self.text.find(stop, max(0, self.emitted - len(stop))) for stop in self._stop) if i >= 0]
        if found:  # the earliest stop string wins
            self.stopped = True
            self.text = self.text[: min(found)]
            return self._take(len(self.text))
        return self._take(len(self.text) - self._hold)

    def finish(self) -> str:
        """The answer ended (end of generation or token limit): the rest of the text."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
