"""The `xllm` command line: one subcommand per module of this package.

Each subcommand module exposes ``register(subparsers)`` which adds its parser and sets
``func(args) -> int``. Modules import their heavy dependencies inside ``func`` so that
``xllm --help`` and ``xllm backends`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "xllm.cli.backends",
    "xllm.cli.conformance",
    "xllm.cli.generate",
    "xllm.cli.make_model",
    "xllm.cli.serve",
    "xllm.cli.router",
    "xllm.cli.cluster",
    "xllm.cli.bench",
)


class CLIError(Exception):
    """An error to report to the user as one line, exit status `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllm", description="xllm: LLM inference on any accelerator")
    from xllm import __version__

    parser.add_argument("--version", action="version", version=f"xllm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"xllm {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
