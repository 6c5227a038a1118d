"""The GGUF writer behind `--compare llama.cpp`: names, shapes, dtypes, tokenizer and rope layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xllm.bench.gguf_export import (
    ensure_gguf,
    gguf_name,
    llama3_rope_factors,
    permute_rotary_rows,
    write_gguf,
)

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")


def _hf_tensors(model_dir) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _field(reader, key: str):
    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return f.parts[f.data[0]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_reader_sees_every_tensor_with_its_shape(tiny_model_dir, tmp_path, family: str) -> None:
    model_dir = tiny_model_dir(family)
    cfg = json.loads((model_dir / "config.json").read_text())
    path = write_gguf(model_dir, tmp_path / "m.gguf", "float32")
    reader = gguf.GGUFReader(str(path))
    got = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors}
    expected = {}
    for name, shape in _hf_tensors(model_dir).items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        # GGUF lists dimensions fastest-first: the reverse of torch's order.
        expected[gguf_name(name)] = tuple(reversed(shape))
    if family == "llama":
        expected["rope_freqs.weight"] = (cfg["head_dim"] // 2,)
    assert {n: s for n, (s, _) in got.items()} == expected
    assert {t for _, t in got.values()} == {gguf.GGMLQuantizationType.F32}
    assert "blk.0.attn_q.weight" in got and "blk.1.ffn_down.weight" in got and "output_norm.weight" in got
    assert ("output.weight" in got) == (not cfg.get("tie_word_embeddings"))
    arch = bytes(_field(reader, "general.architecture")).decode()
    assert arch == family
    assert int(_field(reader, f"{arch}.block_count")[0]) == cfg["num_hidden_layers"]
    assert int(_field(reader, f"{arch}.attention.head_count_kv")[0]) == cfg["num_key_value_heads"]


def test_tokenizer_metadata_covers_the_vocabulary(tiny_llama_dir, tmp_path) -> None:
    reader = gguf.GGUFReader(str(write_gguf(tiny_llama_dir, tmp_path / "m.gguf")))
    tok = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    tokens = [bytes(t).decode() for t in _field(reader, "tokenizer.ggml.tokens")]
    assert len(tokens) == 512
    assert tokens[0] == "<|begin_of_text|>" and tokens[tok["model"]["vocab"]["Ġ"]] == "Ġ"
    types = [int(t[0]) for t in _field(reader, "tokenizer.ggml.token_type")]
    assert types[:5] == [int(gguf.TokenType.CONTROL)] * 5 and types[10] == int(gguf.TokenType.NORMAL)
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert bytes(_field(reader, "tokenizer.ggml.model")).decode() == "gpt2"
    assert bytes(_field(reader, "tokenizer.ggml.pre")).decode() == "gpt-2"


@pytest.mark.parametrize("dtype,kind", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_keeps_vectors_in_float32(tiny_llama_dir, tmp_path, dtype: str, kind: str) -> None:
    reader = gguf.GGUFReader(str(write_gguf(tiny_llama_dir, tmp_path / "m.gguf", dtype)))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind and types["token_embd.weight"] == kind
    assert types["blk.0.attn_norm.weight"] == "F32" and types["rope_freqs.weight"] == "F32"


def test_cache_reuses_the_file_and_keys_on_dtype(tiny_llama_dir, tmp_path) -> None:
    a = ensure_gguf(tiny_llama_dir, "float32", tmp_path)
    mtime = a.stat().st_mtime_ns
    assert ensure_gguf(tiny_llama_dir, "float32", tmp_path) == a and a.stat().st_mtime_ns == mtime
    assert ensure_gguf(tiny_llama_dir, "float16", tmp_path) != a


def _rope_half(x: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Hugging Face: rotate the first half of the head against the second half."""
    ang = pos * inv_freq
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    h = x.shape[-1] // 2
    rotated = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rotated * sin


def _rope_interleaved(x: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """llama.cpp's llama architecture: rotate adjacent pairs (x0, x1), (x2, x3), ..."""
    ang = pos * inv_freq
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * ang.cos() - odd * ang.sin()
    out[..., 1::2] = even * ang.sin() + odd * ang.cos()
    return out


def test_row_permutation_turns_half_rope_into_interleaved_rope() -> None:
    """Attention scores are what matter: q·k after HF's rope on the original weights must equal
    q·k after llama.cpp's rope on the permuted weights."""
    g = torch.Generator().manual_seed(0)
    n_head, head_dim, hidden = 3, 8, 12
    wq, wk = (
        torch.randn(n_head * head_dim, hidden, generator=g),
        torch.randn(n_head * head_dim, hidden, generator=g),
    )
    x = torch.randn(hidden, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    q, k = (wq @ x).view(n_head, head_dim), (wk @ x).view(n_head, head_dim)
    qp = (permute_rotary_rows(wq, n_head) @ x).view(n_head, head_dim)
    kp = (permute_rotary_rows(wk, n_head) @ x).view(n_head, head_dim)
    hf = (_rope_half(q, 5, inv_freq) * _rope_half(k, 2, inv_freq)).sum(-1)
    cpp = (_rope_interleaved(qp, 5, inv_freq) * _rope_interleaved(kp, 2, inv_freq)).sum(-1)
    torch.testing.assert_close(cpp, hf)


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    # llama.cpp divides each base frequency by its factor.
    np.testing.assert_allclose(plain / llama3_rope_factors(16, rope), scaled.numpy(), rtol=1e-5)
