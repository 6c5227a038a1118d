"""`xllm make-model`: writes a small deterministic random checkpoint in Hugging Face layout.

Useful to try xllm without downloading anything, and to create benchmark models (``--size
100m``). The files load in transformers too, so results can be cross-checked there.
"""

from __future__ import annotations

import argparse

FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
)  # mirrors xllm.models.SUPPORTED_FAMILIES (kept light to import)
SIZES = ("tiny", "small", "100m")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-model",
        help="write a small random model (config, safetensors, tokenizer) in Hugging Face layout",
        description="Write a deterministic random checkpoint: same arguments, byte-identical files.",
    )
    p.add_argument("out", help="output directory (created if missing)")
    p.add_argument("--family", choices=FAMILIES, default="llama", help="architecture (default: llama)")
    p.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny: 2 layers, hidden 64; small: 4 layers, hidden 256; 100m: ~100M params (default: tiny)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xllm.models import make_model
    from xllm.models.config import ModelConfig

    out = make_model(args.out, family=args.family, size=args.size, seed=args.seed)
    cfg = ModelConfig.from_pretrained(out)
    params = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) + cfg.num_layers * (
        cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size)
        + cfg.q_size * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    print(
        f"wrote {args.family} {args.size} (seed {args.seed}, ~{params / 1e6:.1f}M params, "
        f"{cfg.num_layers} layers, vocab {cfg.vocab_size}) to {out}"
    )
    return 0
