"""`xllm generate`: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import sys

from xllm.cli.engine_args import add_engine_arguments, engine_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text for a prompt, streamed to the terminal")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from xllm.cli.main import CLIError
    from xllm.engine.sampling_params import SamplingParams
    from xllm.hal import HALError

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            min_tokens=args.min_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.sample_seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CLIError(
            f"invalid sampling parameter {err['loc'][0] if err['loc'] else ''}: {err['msg']}"
        ) from None
    try:
        return asyncio.run(_stream(args, params))
    except (HALError, ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None


async def _stream(args: argparse.Namespace, params) -> int:
    from xllm.engine.async_llm import AsyncLLM

    engine = AsyncLLM(**engine_kwargs(args))
    prompt = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt = {
            "prompt": text,
            "prompt_token_ids": engine.tokenizer(text, add_special_tokens=False).input_ids,
        }
    printed = 0
    try:
        async for out in engine.generate(prompt, params, "cli-0"):
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        sys.stdout.write("\n")
        done = out.outputs[0]
        print(f"[{len(done.token_ids)} tokens, finish_reason={done.finish_reason}]", file=sys.stderr)
    finally:
        await engine.shutdown()
    return 0
