"""Incremental detokenisation and stop-condition checks for one sequence.

Text is produced token by token with the `tokenizers` library's `DecodeStream`, which holds back
bytes until they form valid UTF-8 (a multi-byte character split over tokens never shows up as
U+FFFD). Stop strings are searched only in the tail that the new text could have completed, and
the text is cut before a stop string, as OpenAI's API does.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool, stop: list[str], include_stop_str: bool) -> None:
        self._backend = tokenizer.backend_tokenizer  # the Rust tokenizer behind a fast HF tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop_str = include_stop_str
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""

    def add_token(self, token_id: int) -> str | None:
        """Appends a token's text; returns the stop string it completed, if any (text is then cut)."""
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:
            # An id outside the tokenizer's vocabulary (a model whose vocab is padded past the
            # tokenizer's) decodes to nothing rather than failing the request.
            piece = None
        if not piece:
            return None
        start = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += piece
        for stop in self.stop:
            idx = self.text.find(stop, start)
            if idx != -1:
                self.text = self.text[: idx + len(stop)] if self.include_stop_str else self.text[:idx]
                return stop
        return None
