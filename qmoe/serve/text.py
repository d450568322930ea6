"""Generated tokens -> the text a client sees, with OpenAI's stop strings.

A stop string ends the generation and neither it nor anything after it is
returned, wherever it falls, also across token boundaries: while streaming, the
end of the text that could still become a stop string is held back until the
next tokens show whether it does.
"""

from __future__ import annotations

import codecs

from qmoe.tokenizer import Tokenizer


class TextStream:
    """Feed tokens one at a time; each push returns the text that is final now."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded, not yet returned: the longest end that may begin a stop string
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that `token` completes; after a stop string, `stopped` is True."""
        return self._release(self.decoder.decode(self.tokenizer.decode_token(token)))

    def finish(self) -> str:
        """The rest, at the end of a generation that hit no stop string."""
        text = self._release(self.decoder.decode(b"", final=True))
        rest, self.held = self.held, ""
        return text + rest

    def _release(self, new: str) -> str:
        if self.stopped:
            return ""
        text = self.held + new
        # Everything before `held` was checked: no stop string can begin there (held is the
        # longest end that is a stop string's beginning), so the first match lies in `text`.
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        keep = max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]
