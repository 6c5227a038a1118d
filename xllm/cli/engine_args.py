"""Engine flags shared by `xllm generate`, `xllm serve` and `xllm bench throughput`.

They are derived from `EngineConfig`, not copied from it: every field becomes one flag named
``--field-name`` (or the historical name in `_FLAG_NAMES`), with the field's description as its
help and its default as the flag's, so a knob added to the config reaches the command line with
no change here. Booleans are ``--x`` / ``--no-x`` pairs; lists take one or more values;
`backend_options` is ``--backend-option KEY=VALUE``, repeatable, each VALUE read as JSON when it
parses (``interpret=true``, ``num_threads=4``) and as a plain string otherwise. `engine_kwargs`
turns the parsed flags back into `EngineConfig` keyword arguments, one per field.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable
from typing import Any

from xllm.dtypes import DTYPE_ALIASES
from xllm.engine.config import EngineConfig, parse_bytes

# Fields whose flags are not plain ``--field-name`` (the first name is the one help shows). The
# short boolean names predate this module; vLLM's longer spellings are accepted as well.
_FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "enable_prefix_caching": ("--prefix-caching", "--enable-prefix-caching"),
    "use_graphs": ("--graphs", "--use-graphs"),
    "backend_options": ("--backend-option",),
}


def _byte_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: object = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word is a string: device=npu:1
    return key, value


# Fields whose values need a parser other than their annotation's type.
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"kv_cache_memory": _byte_size}
_FLAG_CHOICES: dict[str, tuple[str, ...]] = {"dtype": ("auto", *DTYPE_ALIASES)}


def flag_names(field: str) -> tuple[str, ...]:
    """The option strings of an `EngineConfig` field (``--no-...`` forms of booleans aside)."""
    return _FLAG_NAMES.get(field, ("--" + field.replace("_", "-"),))


def _value_type(annotation: Any) -> Any:
    """int for ``int | None``, list[int] for ``list[int] | None``; Any stays Any."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine", "every EngineConfig field; see `xllm.engine.config`")
    for name, field in EngineConfig.model_fields.items():
        kind = _value_type(field.annotation)
        help_text = (field.description or "").replace("%", "%%")  # argparse %-formats help
        flags = flag_names(name)
        default = field.get_default(call_default_factory=True)
        if kind is bool:
            # BooleanOptionalAction adds the --no-... forms.
            help_text += f" (default: {'on' if default else 'off'})"
            g.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        elif typing.get_origin(kind) is dict:
            g.add_argument(
                *flags,
                dest=name,
                action="append",
                type=_key_value,
                default=None,
                metavar="KEY=VALUE",
                help=f"{help_text} (repeatable)",
            )
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            g.add_argument(
                *flags, dest=name, nargs="+", type=item, default=default, metavar="N", help=help_text
            )
        else:
            if default is not None and "default" not in help_text:
                help_text += " (default: %(default)s)"
            g.add_argument(
                *flags,
                dest=name,
                type=_FLAG_TYPES.get(name, kind if kind in (int, float) else str),
                choices=_FLAG_CHOICES.get(name),
                default=default,
                help=help_text,
            )


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """`EngineConfig` keyword arguments, one per field, from flags added by `add_engine_arguments`."""
    kwargs = {name: getattr(args, name) for name in EngineConfig.model_fields}
    kwargs["backend_options"] = dict(kwargs["backend_options"] or ())
    return kwargs
