"""load_model / load_tokenizer: sharded checkpoints, dtype choices, tied heads, and the errors a
user sees for a wrong path or a broken checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xllm.hal import get_backend
from xllm.models import (
    MissingWeightError,
    ModelConfigError,
    WeightsNotFoundError,
    load_model,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def backend():
    return get_backend("cpu")


def copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def test_sharded_checkpoint_loads_same_weights(tiny_llama_dir: Path, tmp_path: Path, backend) -> None:
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = copy_without_weights(tiny_llama_dir, tmp_path / "sharded")
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(sharded / file))
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    single = load_model(tiny_llama_dir, backend, progress=False)
    split = load_model(sharded, backend, progress=False)
    assert torch.equal(single.lm_head, split.lm_head)
    for a, b in zip(single.layers, split.layers, strict=True):
        assert torch.equal(a.attn.qkv_weight, b.attn.qkv_weight)
        assert torch.equal(a.mlp.gate_up_weight, b.mlp.gate_up_weight)


def test_missing_shard_is_named(tiny_llama_dir: Path, tmp_path: Path, backend) -> None:
    d = copy_without_weights(tiny_llama_dir, tmp_path / "broken")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsNotFoundError, match="model-00001-of-00002.safetensors"):
        load_model(d, backend, progress=False)


def test_fused_projections_are_q_k_v_and_gate_up_in_order(tiny_llama_dir: Path, backend) -> None:
    raw = load_file(str(tiny_llama_dir / "model.safetensors"))
    model = load_model(tiny_llama_dir, backend, progress=False)
    p = "model.layers.1."
    qkv = torch.cat([raw[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(model.layers[1].attn.qkv_weight, qkv)
    gate_up = torch.cat([raw[p + "mlp.gate_proj.weight"], raw[p + "mlp.up_proj.weight"]])
    assert torch.equal(model.layers[1].mlp.gate_up_weight, gate_up)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("auto", torch.float32),  # tiny checkpoints declare float32
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_choices(tiny_llama_dir: Path, backend, dtype, expected: torch.dtype) -> None:
    model = load_model(tiny_llama_dir, backend, dtype=dtype, progress=False)
    assert model.dtype == expected
    assert model.layers[0].attn.qkv_weight.dtype == expected
    assert model.cos_sin_cache.dtype == torch.float32  # RoPE table stays float32 whatever the weights


def test_auto_dtype_follows_config(tiny_llama_dir: Path, tmp_path: Path, backend) -> None:
    d = tmp_path / "bf16"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("dtype")
    cfg["torch_dtype"] = "bfloat16"  # transformers 4 spelling
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_model(d, backend, progress=False).dtype == torch.bfloat16


def test_bfloat16_forward_tracks_float32(tiny_llama_dir: Path, backend) -> None:
    """A bf16 model gives float32 logits close to the fp32 model's (loose: bf16 has 8 bits)."""
    from xllm.hal.metadata import AttentionMetadata

    outs = []
    for dtype in ("float32", "bfloat16"):
        model = load_model(tiny_llama_dir, backend, dtype=dtype, progress=False)
        cfg = model.config
        caches = backend.allocate_kv_cache(cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim, model.dtype)
        md = AttentionMetadata(
            query_start_loc=torch.tensor([0, 20], dtype=torch.int32),
            seq_lens=torch.tensor([20], dtype=torch.int32),
            block_tables=torch.tensor([[0, 1]], dtype=torch.int32),
            slot_mapping=torch.arange(20),
            max_query_len=20,
            max_seq_len=20,
            scale=model.attention_scale,
        )
        hidden = model.forward(torch.arange(10, 30), torch.arange(20), caches, md)
        assert hidden.dtype == model.dtype and hidden.shape == (20, cfg.hidden_size)
        logits = model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        outs.append(logits)
    assert torch.isfinite(outs[1]).all()
    assert (outs[0] - outs[1]).abs().max() < 0.5


def test_tied_embeddings_share_the_matrix(tiny_model_dir, backend) -> None:
    qwen2 = load_model(tiny_model_dir("qwen2"), backend, progress=False)
    assert qwen2.config.tie_word_embeddings
    assert qwen2.lm_head is qwen2.embed_tokens
    llama = load_model(tiny_model_dir("llama"), backend, progress=False)
    assert llama.lm_head is not llama.embed_tokens


def test_missing_path(tmp_path: Path, backend) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope", backend)


def test_path_is_a_file(tiny_llama_dir: Path, backend) -> None:
    with pytest.raises(NotADirectoryError, match="directory"):
        load_model(tiny_llama_dir / "config.json", backend)


def test_missing_config(tmp_path: Path, backend) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, backend)


def test_missing_weights(tiny_llama_dir: Path, tmp_path: Path, backend) -> None:
    d = copy_without_weights(tiny_llama_dir, tmp_path / "noweights")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
        load_model(d, backend)


def test_missing_tensor_is_named(tiny_llama_dir: Path, tmp_path: Path, backend) -> None:
    d = copy_without_weights(tiny_llama_dir, tmp_path / "partial")
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(MissingWeightError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(d, backend, progress=False)


def test_unknown_family(tiny_llama_dir: Path, tmp_path: Path, backend) -> None:
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="llama, qwen2, qwen3, mistral"):
        load_model(d, backend)


def test_bad_dtype(tiny_llama_dir: Path, backend) -> None:
    with pytest.raises(ValueError, match="int8"):
        load_model(tiny_llama_dir, backend, dtype="int8")


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip(tiny_model_dir) -> None:
    for family in ("llama", "qwen3"):
        tok = load_tokenizer(tiny_model_dir(family))
        text = "Hello world! The quick brown fox: 3.14, émoji 🙂 and\nnew lines."
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_every_model_id_decodes(tiny_llama_dir: Path) -> None:
    """The model may emit any id below vocab_size; the tokenizer must know all of them."""
    from xllm.models import ModelConfig

    tok = load_tokenizer(tiny_llama_dir)
    vocab_size = ModelConfig.from_pretrained(tiny_llama_dir).vocab_size
    assert len(tok) == vocab_size
    tokens = tok.convert_ids_to_tokens(list(range(vocab_size)))
    assert all(isinstance(t, str) and t for t in tokens)
    tok.decode(list(range(vocab_size)))


def test_special_tokens_and_eos(tiny_llama_dir: Path) -> None:
    from xllm.models import ModelConfig, load_generation_config

    tok = load_tokenizer(tiny_llama_dir)
    cfg = ModelConfig.from_pretrained(tiny_llama_dir)
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == cfg.bos_token_id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg.eos_token_ids == [tok.eos_token_id, im_end]
    assert load_generation_config(tiny_llama_dir)["eos_token_ids"] == cfg.eos_token_ids
    # Special tokens are single ids and vanish with skip_special_tokens.
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == im_end
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == tok.encode(text, add_special_tokens=False)


def test_load_tokenizer_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path)
