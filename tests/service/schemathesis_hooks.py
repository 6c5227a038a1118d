"""Schemathesis hooks for test_serve_schemathesis.py: the API rules that no JSON Schema can state.

Everything the server checks field by field is in the published schema, so schemathesis's
positive data is served and its negative data refused. Two kinds of rule are left, and only
for positive data (a generated request that breaks one is not "schema-valid" in the API's sense):

- Rules between fields, stated in the fields' descriptions: `best_of` equals `n`;
  `top_logprobs` above 0 needs `logprobs: true`; `min_tokens` is at most the request's
  max_tokens; the cluster extensions `resume` and `kv_transfer_params` (n = 1, one prompt, the
  tokens resumed leave room under max_tokens and do not already end the request, a decode part
  carries its prefill's token in `resume`). `filter_case` drops the positive cases that break
  one (for the two extensions: any case that sets them, whose rules depend on the tokenizer and
  the model's stop tokens).
- The context length: a prompt's token count depends on the tokenizer, so a schema-valid request
  can overflow the context. The server refuses that with OpenAI's 400 `context_length_exceeded`
  (on /v1/messages, Anthropic's 400 with the same message), which `filter_failure` accepts; any
  other 400 on positive data is still a failure.

Loaded with `SCHEMATHESIS_HOOKS=<this file>`.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _int(body: dict[str, Any], key: str) -> int | None:
    # The server reads 2.0 as 2 (JSON has one number type), and schemathesis sends such values.
    value = body.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def uses_cluster_extension(body: dict[str, Any]) -> bool:
    """`resume` or an active `kv_transfer_params`: requests the cluster router makes."""
    kv = body.get("kv_transfer_params")
    active_kv = isinstance(kv, dict) and (
        kv.get("do_remote_decode") is True or kv.get("do_remote_prefill") is True
    )
    return body.get("resume") is not None or active_kv


def breaks_cross_field_rule(path: str, body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if path in ("/v1/completions", "/v1/chat/completions") and uses_cluster_extension(body):
        return True
    if path == "/v1/completions":
        best_of, n = _int(body, "best_of"), _int(body, "n")
        if best_of is not None and best_of != (1 if n is None else n):
            return True
        max_tokens = _int(body, "max_tokens") if "max_tokens" in body else COMPLETION_DEFAULT_MAX_TOKENS
    elif path == "/v1/chat/completions":
        top_logprobs = _int(body, "top_logprobs")
        if top_logprobs and body.get("logprobs") is not True:
            return True
        max_tokens = _int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens")
    else:
        return False
    min_tokens = _int(body, "min_tokens")
    # Without max_tokens the completion may use the whole context: an overflow is the server's call.
    return min_tokens is not None and max_tokens is not None and min_tokens > max_tokens


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    return not breaks_cross_field_rule(case.operation.path, case.body)


def is_context_overflow(body: Any) -> bool:
    """Whether an error body is the server's refusal of a request too long for the context."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    if "code" in error:  # OpenAI's shape names the case
        return error["code"] == "context_length_exceeded"
    # Anthropic's shape (/v1/messages) has no code; its message is the one serving.py writes.
    return body.get("type") == "error" and "maximum context length" in str(error.get("message"))


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a positive request refused for overflowing the context."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return True
    try:
        body = response.json()
    except Exception:
        return True
    return not is_context_overflow(body)
