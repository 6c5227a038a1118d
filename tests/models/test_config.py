"""ModelConfig reads both config.json dialects and resolves each family's quirks; the RoPE
table is bit-identical to transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xllm.models import SUPPORTED_FAMILIES, ModelConfig, ModelConfigError, load_generation_config
from xllm.models.layers import build_cos_sin_cache

BASE = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}


def cfg(**overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict({**BASE, **overrides})


def test_basic_fields_and_defaults() -> None:
    c = cfg(eos_token_id=[5, 7], bos_token_id=1)
    assert (c.family, c.num_layers, c.num_heads, c.num_kv_heads) == ("llama", 4, 8, 2)
    assert c.head_dim == 32  # hidden / heads when config.json has no head_dim
    assert c.eos_token_ids == [5, 7] and c.bos_token_id == 1
    assert cfg(eos_token_id=2).eos_token_ids == [2]
    assert c.rope_theta == 10000.0 and c.rope_scaling is None
    assert c.dtype is None and c.sliding_window is None and not c.attention_bias
    assert c.attention_scale == 32**-0.5


def test_dtype_both_spellings() -> None:
    assert cfg(dtype="bfloat16").dtype == torch.bfloat16
    assert cfg(torch_dtype="float16").dtype == torch.float16


def test_llama3_rope_transformers4_dialect() -> None:
    c = cfg(
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert c.rope_theta == 500000.0
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0


def test_llama3_rope_transformers5_dialect() -> None:
    c = cfg(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert c.rope_theta == 500000.0 and c.rope_scaling["factor"] == 32.0
    assert cfg(rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_scaling is None


def test_unsupported_rope_type() -> None:
    with pytest.raises(ModelConfigError, match="yarn"):
        cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_unknown_model_type_lists_families() -> None:
    with pytest.raises(ModelConfigError) as err:
        cfg(model_type="falcon")
    assert "falcon" in str(err.value)
    for family in SUPPORTED_FAMILIES:
        assert family in str(err.value)


def test_missing_required_field() -> None:
    raw = dict(BASE)
    del raw["hidden_size"]
    with pytest.raises(ModelConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(raw)


def test_family_quirks() -> None:
    qwen2 = cfg(model_type="qwen2", sliding_window=131072, use_sliding_window=False)
    assert qwen2.attention_bias and not qwen2.o_proj_bias  # hard-coded q/k/v bias
    assert qwen2.sliding_window is None  # window off unless use_sliding_window
    qwen3 = cfg(model_type="qwen3", head_dim=128)
    assert qwen3.qk_norm and qwen3.head_dim == 128 and qwen3.q_size == 8 * 128
    assert cfg(attention_bias=True).o_proj_bias  # Llama's flag covers o_proj too
    assert cfg(model_type="mistral", sliding_window=4096).sliding_window == 4096
    assert cfg(model_type="mistral", sliding_window=None).sliding_window is None


def test_qwen_sliding_window_layers() -> None:
    all_sliding = cfg(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert all_sliding.sliding_window == 64
    none_sliding = cfg(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=4)
    assert none_sliding.sliding_window is None
    with pytest.raises(ModelConfigError, match="mixes"):
        cfg(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=2)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_generation_config(tmp_path: Path) -> None:
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "eos_token_id": 3, "transformers_version": "5"})
    )
    assert load_generation_config(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "eos_token_ids": [3]}


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_cos_sin_cache_matches_transformers_exactly(rope_parameters: dict) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = {**BASE, "head_dim": 16, "rope_parameters": rope_parameters}
    hf_cfg = LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    rotary = LlamaRotaryEmbedding(hf_cfg)
    positions = torch.arange(300)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    ours = ModelConfig.from_hf_dict(raw)
    cache = build_cos_sin_cache(ours.head_dim, 300, ours.rope_theta, ours.rope_scaling)
    half = ours.head_dim // 2
    assert cache.dtype == torch.float32 and cache.shape == (300, ours.head_dim)
    assert torch.equal(cache[:, :half], cos[0, :, :half])
    assert torch.equal(cache[:, half:], sin[0, :, :half])
