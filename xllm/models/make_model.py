"""Writes small, deterministic Hugging Face checkpoints with random weights (tests, demos, bench).

`make_model(out_dir, family, size, seed)` produces exactly what a real Hub download contains —
``config.json`` (transformers 5 dialect), ``model.safetensors``, ``generation_config.json`` and a
real byte-level BPE tokenizer with a ChatML chat template — so every layer of xllm, and
transformers itself, loads it as it would a real model. Nothing is downloaded: the tokenizer is
trained with the `tokenizers` library on a corpus embedded below, and the weights come from a
seeded `torch.Generator`. The same arguments give byte-identical files on every run, so test
fixtures can be cached and parity failures reproduced.

Weights are not the usual std-0.02 init: projections use ``1/sqrt(fan_in)`` so every layer
changes the residual stream (attention, the sliding window and RoPE then visibly matter), and the
output head is scaled so logits have a spread of a few units, which keeps greedy argmax far from
ties that float rounding could flip between implementations.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xllm.dtypes import torch_dtype
from xllm.models.config import SUPPORTED_FAMILIES

# Bumped whenever the files written for the same arguments change (the default-model cache keys on it).
MAKE_MODEL_VERSION = 1

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Fixed order: these take ids 0..4 in every generated tokenizer.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)

# ChatML, as Qwen ships it, with the BOS token in front as Llama 3 does. A default system prompt
# is not injected so that templated prompts stay short in tests.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SIZES: tuple[str, ...] = ("tiny", "small", "100m")

# Training text for the tokenizer. Any fixed text works; this one mixes prose, dialogue, code and
# numbers so the merges look like those of a real tokenizer.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he went out in his boat, and every evening he came home with the day's catch.
The history of computing is a story of machines that learned to remember, to calculate and to speak.
Large language models predict the next token of a text, one token at a time, from everything before it.
An inference engine schedules many requests together, stores their keys and values in a paged cache,
and runs one forward pass per step for the whole batch.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Please tell me a story about a dragon who was afraid of the dark.
The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome.
Water boils at 100 degrees Celsius and freezes at 0 degrees at sea level.
One, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10 11 12 2024 3.14159
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10):
    print(f"step {i}: value = {i * i}")
import torch
x = torch.zeros(4, 8, dtype=torch.float32)
{"model": "xllm", "messages": [{"role": "user", "content": "Hi there"}], "temperature": 0.7}
The sun rises in the east and sets in the west. Spring, summer, autumn and winter follow each other.
She opened the window and looked at the garden, where the roses had just begun to bloom.
In mathematics, a prime number is a natural number greater than one that has no divisors but one and itself.
The train leaves at nine o'clock in the morning and arrives in the city before noon.
Music, painting and poetry are ways in which people share what they feel with each other.
Scientists measure, compare and test their ideas; a good experiment can show that an idea is wrong.
Questions and answers, requests and responses: a server listens, a client asks, and the model replies.
"""

_SYLLABLES = (
    "ka ri to na mi se lo ve an el in on un er ar or es is os ta te ti tu de di do du ma me mo mu "
    "la le li lu ra re ro ru sa si so su pa pe pi po ba be bi bo ga ge go fa fe fi fo ha he hi ho "
    "ch sh th st tr pr br gr cl fl pl ing ion ent ous ive ful est"
).split()


def _training_lines(vocab_size: int) -> list[str]:
    """The corpus, plus (for large vocabularies) seeded pseudo-words, so the BPE trainer can find
    enough distinct merges to fill the vocabulary instead of leaving reserved filler ids."""
    lines = CORPUS.splitlines() * 4
    if vocab_size > 1024:
        # Repeat the real text enough that its merges are learned before the pseudo-words'.
        lines = CORPUS.splitlines() * 64
        rng = random.Random(20240601)  # fixed: the corpus is part of the tokenizer's definition
        num_words = vocab_size * 12
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(num_words)]
        # Each pseudo-word appears several times so its merges beat chance pairings.
        words = words * 3
        rng.shuffle(words)
        lines += [" ".join(words[i : i + 16]) for i in range(0, len(words), 16)]
    return lines


def build_tokenizer(vocab_size: int):
    """A trained byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` ids.

    Special tokens take ids 0..4, the 256 byte symbols follow, then merges. If the corpus runs
    out of merges the rest is filled with ``<|reserved_N|>`` special tokens (as Llama 3 does), so
    every id below `vocab_size` — any id the model can emit — decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (need >= 261)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_lines(vocab_size), trainer=trainer)
    have = tok.get_vocab_size(with_added_tokens=True)
    if have < vocab_size:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - have)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def save_tokenizer(tok, out_dir: Path, max_length: int) -> None:
    """Saves through transformers so ``AutoTokenizer.from_pretrained`` sees a normal HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))
    # transformers 5 records its new class name; the old name loads under both 4.x and 5.x.
    config_file = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True, slots=True)
class _Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_pos: int


_SHAPES: dict[str, _Shape] = {
    "tiny": _Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, max_pos=2048),
    "small": _Shape(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768, vocab=2048, max_pos=4096),
    # ~100M parameters, shaped like a scaled-down Llama 3 (GQA 3:1).
    "100m": _Shape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2560, vocab=8192, max_pos=4096),
}


def hf_config(family: str, size: str) -> dict[str, Any]:
    """The config.json dict for a family and size (transformers 5 dialect: ``dtype``, ``rope_parameters``)."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(SUPPORTED_FAMILIES)}")
    if size not in _SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    s = _SHAPES[size]
    bos, eos, im_end, pad = (SPECIAL_TOKENS.index(t) for t in (BOS_TOKEN, EOS_TOKEN, IM_END, PAD_TOKEN))
    cfg: dict[str, Any] = {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
                "mistral": "MistralForCausalLM",
            }[family]
        ],
        "model_type": family,
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.hidden // s.heads,
        "hidden_act": "silu",
        "max_position_embeddings": s.max_pos,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": [eos, im_end],
        "pad_token_id": pad,
        "initializer_range": 0.02,
        "use_cache": True,
        # Tiny models stay float32 so parity against transformers is exact to ~1e-6; the 100M
        # model is stored in bfloat16 like real checkpoints (half the disk and load time).
        "dtype": "bfloat16" if size == "100m" else "float32",
    }
    if family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        # Llama 3.1-style rope scaling. The original context is set small relative to the head
        # dims' wavelengths so that the tiny model has unscaled, smoothed and scaled frequencies.
        cfg["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64 if size == "tiny" else 1024,
        }
    elif family == "qwen2":
        cfg.update(
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=s.layers,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    elif family == "qwen3":
        # Qwen3 sets head_dim explicitly, not hidden/heads; make them differ so the code must read it.
        cfg.update(
            head_dim=2 * s.hidden // s.heads,
            attention_bias=False,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=s.layers,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    elif family == "mistral":
        # A window shorter than test prompts, so sliding-window masking is exercised.
        cfg.update(sliding_window=32 if size == "tiny" else 1024)
    return cfg


def random_weights(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """HF-named tensors drawn from a seeded generator, in a fixed order (determinism)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(cfg["dtype"])
    hidden, head_dim = cfg["hidden_size"], cfg["head_dim"]
    q_size = cfg["num_attention_heads"] * head_dim
    kv_size = cfg["num_key_value_heads"] * head_dim
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    tied = cfg["tie_word_embeddings"]
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    out: dict[str, torch.Tensor] = {}

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)

    def linear(name: str, out_f: int, in_f: int) -> None:
        out[name] = normal((out_f, in_f), 1.0 / math.sqrt(in_f))

    def norm(name: str, dim: int) -> None:
        # Not all ones: a norm weight loaded into the wrong place must change the output.
        out[name] = (1.0 + normal((dim,), 0.1).float()).to(dtype)

    # The output head's logits get a spread of ~4 (see module docstring); a tied embedding is that head.
    head_std = 4.0 / math.sqrt(hidden)
    out["model.embed_tokens.weight"] = normal((vocab, hidden), head_std if tied else 1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm.weight", hidden)
        linear(p + "self_attn.q_proj.weight", q_size, hidden)
        linear(p + "self_attn.k_proj.weight", kv_size, hidden)
        linear(p + "self_attn.v_proj.weight", kv_size, hidden)
        if qkv_bias:
            out[p + "self_attn.q_proj.bias"] = normal((q_size,), 0.1)
            out[p + "self_attn.k_proj.bias"] = normal((kv_size,), 0.1)
            out[p + "self_attn.v_proj.bias"] = normal((kv_size,), 0.1)
        if cfg["model_type"] == "qwen3":
            norm(p + "self_attn.q_norm.weight", head_dim)
            norm(p + "self_attn.k_norm.weight", head_dim)
        linear(p + "self_attn.o_proj.weight", hidden, q_size)
        if cfg.get("attention_bias", False) and cfg["model_type"] in ("llama", "qwen3"):
            out[p + "self_attn.o_proj.bias"] = normal((hidden,), 0.1)
        norm(p + "post_attention_layernorm.weight", hidden)
        linear(p + "mlp.gate_proj.weight", inter, hidden)
        linear(p + "mlp.up_proj.weight", inter, hidden)
        linear(p + "mlp.down_proj.weight", hidden, inter)
    norm("model.norm.weight", hidden)
    if not tied:
        out["lm_head.weight"] = normal((vocab, hidden), head_std)
    return out


def make_model(out_dir: str | Path, family: str = "llama", size: str = "tiny", seed: int = 0) -> Path:
    """Writes a complete HF checkpoint to `out_dir` (created if needed) and returns its path.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with the chat template). Deterministic in (family, size, seed).
    """
    from safetensors.torch import save_file

    cfg = hf_config(family, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = random_weights(cfg, seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it 0600; others may share the cache
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    generation = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"],
    }  # no sampling defaults: requests that set nothing stay greedy-by-default for the engine
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    # Train in a scratch dir: save_pretrained writes several files we then copy as a set.
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(build_tokenizer(cfg["vocab_size"]), Path(tmp), cfg["max_position_embeddings"])
        for f in sorted(Path(tmp).iterdir()):
            shutil.copyfile(f, out / f.name)
    return out
