"""Engine flags: every `EngineConfig` field is reachable from `xllm serve`, `generate` and `bench`.

The flags are derived from the config, so a knob added there cannot be forgotten here; the names
users already type (``--no-prefix-caching``, ``--no-graphs``, ``--kv-cache-memory 2GiB`` ...)
keep working, and backend options are ``--backend-option KEY=VALUE``.
"""

from __future__ import annotations

import argparse

import pytest

from xllm.cli.engine_args import add_engine_arguments, engine_kwargs
from xllm.cli.main import build_parser
from xllm.engine.config import EngineConfig

# One non-default setting per EngineConfig field: its flags, and the value the config must hold.
NON_DEFAULT: dict[str, tuple[list[str], object]] = {
    "model": (["--model", "/models/x"], "/models/x"),
    "backend": (["--backend", "cuda"], "cuda"),
    "dtype": (["--dtype", "fp16"], "float16"),
    "quantization": (["--quantization", "int8"], "int8"),
    "max_model_len": (["--max-model-len", "512"], 512),
    "block_size": (["--block-size", "32"], 32),
    "kv_cache_memory": (["--kv-cache-memory", "2GiB"], 2 << 30),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "enable_prefix_caching": (["--no-prefix-caching"], False),
    "enable_chunked_prefill": (["--no-enable-chunked-prefill"], False),
    "seed": (["--seed", "7"], 7),
    "max_num_seqs": (["--max-num-seqs", "8"], 8),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "1024"], 1024),
    "use_graphs": (["--no-graphs"], False),
    "capture_sizes": (["--capture-sizes", "1", "2", "4"], [1, 2, 4]),
    "tokenizer": (["--tokenizer", "/tok"], "/tok"),
    "backend_options": (
        ["--backend-option", "interpret=true", "--backend-option", "device=npu:1"],
        {"interpret": True, "device": "npu:1"},
    ),
    "tensor_parallel_size": (["--tensor-parallel-size", "2"], 2),
    "max_consecutive_step_failures": (["--max-consecutive-step-failures", "5"], 5),
    "num_speculative_tokens": (["--num-speculative-tokens", "4"], 4),
    "speculative_ngram_max": (["--speculative-ngram-max", "2"], 2),
    "speculative_model": (["--speculative-model", "/draft", "--num-speculative-tokens", "2"], "/draft"),
    "async_scheduling": (["--async-scheduling"], True),
}


def engine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser


def config_from(argv: list[str]) -> EngineConfig:
    return EngineConfig(**engine_kwargs(engine_parser().parse_args(argv)))


@pytest.mark.parametrize("field", list(EngineConfig.model_fields))
def test_every_engine_config_field_is_reachable_from_the_cli(field: str) -> None:
    assert field in NON_DEFAULT, f"add a CLI case for the new EngineConfig field {field!r}"
    argv, want = NON_DEFAULT[field]
    config = config_from(argv)
    assert getattr(config, field) == want
    assert want != EngineConfig.model_fields[field].get_default(call_default_factory=True)


def test_the_field_cases_name_only_real_fields() -> None:
    assert set(NON_DEFAULT) <= set(EngineConfig.model_fields)


def test_no_flags_give_the_config_defaults() -> None:
    assert config_from([]) == EngineConfig()


# Each refuses a flag of the rest (tensor parallelism, speculation): checked one at a time above.
EXCLUSIVE = {"speculative_model", "async_scheduling"}


def test_all_flags_at_once_and_the_long_boolean_spellings() -> None:
    together = {f: case for f, case in NON_DEFAULT.items() if f not in EXCLUSIVE}
    config = config_from([arg for argv, _ in together.values() for arg in argv])
    assert {f: getattr(config, f) for f in together} == {f: want for f, (_, want) in together.items()}
    config = config_from(["--no-enable-prefix-caching", "--no-use-graphs", "--no-enable-chunked-prefill"])
    assert not (config.enable_prefix_caching or config.use_graphs or config.enable_chunked_prefill)
    config = config_from(["--no-graphs", "--graphs", "--prefix-caching"])  # the last one wins
    assert config.use_graphs and config.enable_prefix_caching


def test_help_comes_from_the_field_descriptions(capsys) -> None:
    with pytest.raises(SystemExit):
        engine_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, field in EngineConfig.model_fields.items():
        assert field.description, f"EngineConfig.{name} has no description"
        assert " ".join(field.description.split()) in help_text, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend-option", "interpret"], "expected KEY=VALUE"),
        (["--kv-cache-memory", "lots"], "cannot parse a byte size"),
        (["--dtype", "float64"], "invalid choice"),
    ],
)
def test_bad_values_are_argparse_errors(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        engine_parser().parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["generate", "--prompt", "hi"], ["bench", "throughput"]])
def test_serve_generate_and_bench_take_every_engine_flag(command) -> None:
    groups = [{f: case for f, case in NON_DEFAULT.items() if f not in EXCLUSIVE}]
    groups += [{f: NON_DEFAULT[f]} for f in sorted(EXCLUSIVE)]
    for together in groups:
        argv = [arg for flags, _ in together.values() for arg in flags]
        config = EngineConfig(**engine_kwargs(build_parser().parse_args([*command, *argv])))
        assert {f: getattr(config, f) for f in together} == {f: want for f, (_, want) in together.items()}
