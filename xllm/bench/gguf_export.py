"""Writes a GGUF file from a Hugging Face safetensors checkpoint, so llama.cpp runs the same weights.

Only what `xllm bench throughput --compare llama.cpp` needs: dense Llama-style decoders
(``llama``, ``mistral``, ``qwen2``, ``qwen3``) in float32, float16 or bfloat16, with the
checkpoint's byte-level BPE tokenizer stored as ``tokenizer.ggml.*`` (model ``gpt2``) so that
llama.cpp loads the file. It follows llama.cpp's own ``convert_hf_to_gguf.py`` where it matters:

* For the ``llama`` architecture llama.cpp applies rotary embeddings to interleaved pairs, while
  Hugging Face rotates the two halves of each head; the rows of ``q_proj``/``k_proj`` are
  therefore permuted per head. ``qwen2``/``qwen3`` use llama.cpp's NeoX rope and need no permute.
* Llama 3 rope scaling becomes a ``rope_freqs`` tensor of per-frequency divisors.
* One-dimensional tensors (norms, biases, rope factors) stay float32, as the converter keeps them.
* Mistral's sliding window is not written: llama.cpp's llama architecture attends to the whole
  context, which equals Mistral only while prompt plus output fit in the window.

The file is cached under ``$XLLM_CACHE_DIR/gguf/<key>/`` where the key hashes the checkpoint's
path, file sizes and modification times, the dtype and `EXPORT_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Bumped whenever the bytes written for the same checkpoint change (the cache keys on it).
EXPORT_VERSION = 1

# HF model_type -> llama.cpp architecture name.
ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Per-layer HF suffix -> GGUF suffix (``model.layers.N.`` -> ``blk.N.``).
_LAYER_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

_DTYPES = ("float32", "float16", "bfloat16")


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of an HF tensor name (KeyError when the exporter does not know it)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    prefix = "model.layers."
    if hf_name.startswith(prefix):
        layer, _, rest = hf_name[len(prefix) :].partition(".")
        return f"blk.{int(layer)}.{_LAYER_TENSORS[rest]}"
    raise KeyError(hf_name)


def permute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorders the rows of a Q or K projection from HF's half-split rope to llama.cpp's interleaved
    one: within each head, row ``j`` of the first half and row ``j`` of the second half become
    rows ``2j`` and ``2j+1``."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def llama3_rope_factors(head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, as llama.cpp's ``rope_freqs`` tensor."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; older checkpoints have rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        rope = dict(cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
    rope.setdefault("rope_type", "default")
    return rope


def _checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def cache_key(model_dir: str | os.PathLike[str], dtype: str) -> str:
    """Changes whenever a checkpoint file changes (size or mtime), the dtype or the exporter."""
    root = Path(model_dir).resolve()
    h = hashlib.sha256(f"{EXPORT_VERSION}\0{root}\0{dtype}".encode())
    for f in [*_checkpoint_files(root), root / "config.json", root / "tokenizer.json"]:
        st = f.stat()
        h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cached_gguf_path(model_dir: str | os.PathLike[str], dtype: str, cache_dir: Path | None = None) -> Path:
    if cache_dir is None:
        from xllm.models.default_model import cache_root

        cache_dir = cache_root() / "gguf"
    return cache_dir / cache_key(model_dir, dtype) / "model.gguf"


def ensure_gguf(
    model_dir: str | os.PathLike[str], dtype: str = "float32", cache_dir: Path | None = None
) -> Path:
    """The cached GGUF of `model_dir` in `dtype`, written first if missing."""
    path = cached_gguf_path(model_dir, dtype, cache_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            write_gguf(model_dir, tmp, dtype)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for f in _checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def _to_numpy(tensor: Any, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype for GGUFWriter.add_tensor); 1-D tensors always float32."""
    import gguf
    import torch

    if tensor.dim() <= 1 or dtype == "float32":
        return tensor.to(torch.float32).contiguous().numpy(), None
    if dtype == "float16":
        return tensor.to(torch.float16).contiguous().numpy(), None
    # numpy has no bfloat16: pass the raw 16-bit patterns and name the type.
    bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return bits, gguf.GGMLQuantizationType.BF16


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int, cfg: dict[str, Any]) -> None:
    import gguf

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise NotImplementedError(f"tokenizer model {model.get('type')!r}: only byte-level BPE is exported")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for text, idx in model["vocab"].items():
        if idx < vocab_size:
            tokens[idx] = text
    for added in tok.get("added_tokens", []):
        idx = added["id"]
        if idx < vocab_size:
            tokens[idx] = added["content"]
            types[idx] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for idx, text in enumerate(tokens):
        if text is None:
            # The embedding has rows the tokenizer does not name; llama.cpp needs one token per row.
            tokens[idx] = f"[PAD{idx}]"
            types[idx] = gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    # The checkpoint's pre-tokenizer is ByteLevel with the GPT-2 regex, which is llama.cpp's "gpt-2".
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    def first(value: Any) -> int | None:
        return value[0] if isinstance(value, list) and value else value

    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = first(cfg.get(key))
        if isinstance(value, int):
            add(value)
    # Prompts are given as token ids; nothing should be prepended to them.
    writer.add_add_bos_token(False)


def write_gguf(
    model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], dtype: str = "float32"
) -> Path:
    """Converts the checkpoint in `model_dir` to one GGUF file at `out_path` and returns that path."""
    import gguf

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    root = Path(model_dir)
    cfg = json.loads((root / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(
            f"model_type {model_type!r}: GGUF export supports {', '.join(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[model_type]
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    vocab = int(cfg["vocab_size"])
    rope = _rope_parameters(cfg)
    if rope["rope_type"] not in ("default", "llama3"):
        raise NotImplementedError(f"rope_type {rope['rope_type']!r} is not exported")

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(root.name)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab)
    writer.add_file_type(
        {
            "float32": gguf.LlamaFileType.ALL_F32,
            "float16": gguf.LlamaFileType.MOSTLY_F16,
            "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
        }[dtype]
    )
    _add_tokenizer(writer, root, vocab, cfg)

    if rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, rope))
    tied = bool(cfg.get("tie_word_embeddings", False))
    for name, tensor in _tensors(root):
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd when output is absent
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = gguf_name(name)
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            tensor = permute_rotary_rows(tensor, n_head)
        elif arch == "llama" and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            tensor = permute_rotary_rows(tensor, n_kv)
        data, raw_dtype = _to_numpy(tensor, dtype)
        writer.add_tensor(new_name, data, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)
