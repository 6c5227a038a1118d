"""make_model writes byte-identical checkpoints that transformers loads; the default model is
built once, atomically, into the cache directory; `xllm make-model` drives it."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import threading
from pathlib import Path

import pytest

from xllm.models import ModelConfig, default_model_path, make_model


def digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_byte_for_byte_deterministic(family: str, tiny_model_dir, tmp_path: Path) -> None:
    again = make_model(tmp_path / "again", family, "tiny", seed=0)
    assert digests(again) == digests(tiny_model_dir(family))
    other_seed = make_model(tmp_path / "seed1", family, "tiny", seed=1)
    assert digests(other_seed)["model.safetensors"] != digests(again)["model.safetensors"]
    assert digests(other_seed)["tokenizer.json"] == digests(again)["tokenizer.json"]


def test_layout_and_family_fields(tiny_model_dir) -> None:
    for family in ("llama", "qwen2", "qwen3", "mistral"):
        d = tiny_model_dir(family)
        for name in (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ):
            assert (d / name).is_file(), f"{family}: {name} missing"
        raw = json.loads((d / "config.json").read_text())
        assert raw["dtype"] == "float32" and "torch_dtype" not in raw  # transformers 5 style
        c = ModelConfig.from_pretrained(d)
        assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == (64, 2, 4, 2, 512)
    assert ModelConfig.from_pretrained(tiny_model_dir("llama")).rope_scaling["rope_type"] == "llama3"
    qwen2 = ModelConfig.from_pretrained(tiny_model_dir("qwen2"))
    assert qwen2.attention_bias and qwen2.tie_word_embeddings
    qwen3 = ModelConfig.from_pretrained(tiny_model_dir("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim != qwen3.hidden_size // qwen3.num_heads
    assert ModelConfig.from_pretrained(tiny_model_dir("mistral")).sliding_window == 32


def test_transformers_loads_it(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_dir("qwen3")
    model = AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert len(AutoTokenizer.from_pretrained(d)) == model.config.vocab_size


def test_unknown_family_and_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family"):
        make_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="size"):
        make_model(tmp_path, "llama", "7b")


def test_default_model_built_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(default_model_path())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [tmp_path / "default-model"] * 3
    # Only the finished model remains: no half-written temporary directories.
    assert [p.name for p in tmp_path.iterdir()] == ["default-model"]
    assert ModelConfig.from_pretrained(results[0]).family == "llama"
    mtime = (results[0] / "model.safetensors").stat().st_mtime_ns
    assert default_model_path() == results[0]
    assert (results[0] / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_stale_default_model_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "default-model"
    stale.mkdir()
    (stale / "xllm_model.json").write_text('{"version": 0}')
    path = default_model_path()
    assert path == stale and (path / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default-model"]


def test_cli_make_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xllm.cli import make_model as cli
    from xllm.models import SUPPORTED_FAMILIES

    assert cli.FAMILIES == SUPPORTED_FAMILIES  # the CLI keeps its own copy to import fast

    parser = argparse.ArgumentParser(prog="xllm")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["make-model", str(tmp_path / "m"), "--family", "mistral", "--seed", "3"])
    assert args.func(args) == 0
    assert ModelConfig.from_pretrained(tmp_path / "m").family == "mistral"
    assert "mistral tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["make-model", str(tmp_path / "x"), "--family", "gpt2"])


@pytest.mark.slow
def test_100m_model(tmp_path: Path) -> None:
    """The benchmark-size model: ~100M parameters, bf16 on disk, an 8192-id tokenizer that fills
    the vocabulary with learned merges, and logits that match transformers."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from xllm.hal import get_backend
    from xllm.hal.metadata import AttentionMetadata
    from xllm.models import load_model, load_tokenizer

    d = make_model(tmp_path / "m", "llama", "100m")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        num_params = sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    assert 90e6 < num_params < 110e6
    tok = load_tokenizer(d)
    assert len(tok) == 8192
    assert not any(t.startswith("<|reserved") for t in tok.get_vocab())
    assert len(tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)) <= 12

    backend = get_backend("cpu")
    model = load_model(d, backend, dtype="float32", progress=False)
    assert load_model(d, backend, progress=False).dtype == torch.bfloat16  # auto follows config
    ids = torch.arange(100, 120)
    cfg = model.config
    caches = backend.allocate_kv_cache(cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    md = AttentionMetadata(
        query_start_loc=torch.tensor([0, 20], dtype=torch.int32),
        seq_lens=torch.tensor([20], dtype=torch.int32),
        block_tables=torch.tensor([[1, 0]], dtype=torch.int32),
        slot_mapping=torch.tensor([16 + i for i in range(16)] + [0, 1, 2, 3]),
        max_query_len=20,
        max_seq_len=20,
        scale=model.attention_scale,
    )
    ours = model.compute_logits(model.forward(ids, torch.arange(20), caches, md))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert (ours - ref).abs().max() < 1e-3
