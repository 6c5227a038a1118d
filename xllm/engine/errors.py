"""Errors the engine raises at its boundary (request admission), before anything is queued."""

from __future__ import annotations


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context (or the KV cache) and was rejected alone."""

    param = "prompt"


class EngineDeadError(RuntimeError):
    """The engine loop stopped and can no longer serve requests."""
