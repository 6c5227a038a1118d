"""Incremental detokenisation and stop-condition checks for one sequence.

Text is produced token by token with the `tokenizers` library's `DecodeStream`, which holds back
bytes until they form valid UTF-8 (a multi-byte character split over tokens never shows up as
U+FFFD); when the sequence ends, `flush` appends what is still held back as `tokenizer.decode`
would show it, so the final text equals the decode of the output ids. Stop strings are searched
only in the tail that the new text could have completed, and the text is cut before a stop
string, as OpenAI's API does.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool, stop: list[str], include_stop_str: bool) -> None:
        self._backend = tokenizer.backend_tokenizer  # the Rust tokenizer behind a fast HF tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # ids whose bytes the stream holds back (an unfinished character)
        self.stop = stop
        self.include_stop_str = include_stop_str
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Appends a token's text; returns the stop string it completed, if any (text is then cut).

        With ``check_stop`` False (before min_tokens) stop strings are neither searched nor cut.
        """
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:
            # An id outside the tokenizer's vocabulary (a model whose vocab is padded past the
            # tokenizer's) decodes to nothing rather than failing the request.
            return None
        if not piece:
            self._pending.append(token_id)
            return None
        self._pending.clear()
        start = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += piece
        if not check_stop:
            return None
        for stop in self.stop:
            idx = self.text.find(stop, start)
            if idx != -1:
                self.text = self.text[: idx + len(stop)] if self.include_stop_str else self.text[:idx]
                return stop
        return None

    @property
    def stable_text(self) -> str:
        """The text to show while the sequence runs: without the last ``max_stop_len - 1``
        characters, which a stop string completed later could still cut (so that streamed text
        only ever grows)."""
        hold = 0 if self.include_stop_str else self._max_stop_len - 1
        return self.text[: len(self.text) - hold] if hold > 0 else self.text

    def flush(self) -> None:
        """At the end of the sequence: appends the text of held-back tokens (an unfinished UTF-8
        character shows as U+FFFD, as in `tokenizer.decode`)."""
        if self._pending:
            self.text += self._backend.decode(self._pending, skip_special_tokens=self._skip_special_tokens)
            self._pending = []
