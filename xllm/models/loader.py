"""Loads a Hugging Face checkpoint directory into a family `CausalLM` on a backend's device.

Reads ``config.json`` and the safetensors weights (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``), casts them to the chosen dtype, fuses the projections the
kernels consume together (q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``) and moves them to
``backend.device(device_index)``. This is the boundary where user input enters the models
package, so every failure here names the path, file or tensor the user must fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xllm.hal.backend import INT8_GROUP_SIZE, Backend
from xllm.models.causal_lm import CausalLM
from xllm.models.config import SUPPORTED_FAMILIES, ModelConfig, parse_dtype
from xllm.models.layers import Int8Weight, MissingWeightError, Weights
from xllm.models.llama import LlamaForCausalLM
from xllm.models.mistral import MistralForCausalLM
from xllm.models.qwen2 import Qwen2ForCausalLM
from xllm.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "mistral": MistralForCausalLM,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_FAMILIES)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class WeightsNotFoundError(FileNotFoundError):
    """The model directory has no safetensors weights xllm can read."""


def check_model_dir(path: str | Path) -> Path:
    """The directory as a Path, or FileNotFoundError/NotADirectoryError saying what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; pass a local Hugging Face model directory"
        )
    if not path.is_dir():
        raise NotADirectoryError(
            f"model path {str(path)!r} is a file; pass the directory that holds config.json"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}; is this a Hugging Face model directory?")
    return path


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """'auto' -> the checkpoint's dtype from config.json (float32 when it says nothing)."""
    if dtype == "auto":
        return config.dtype or torch.float32
    try:
        return parse_dtype(dtype)  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, shards in index order."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        if not files:
            raise WeightsNotFoundError(f"{index} has an empty weight_map")
        return files
    single = path / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    legacy = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(sorted(legacy))}: convert them to safetensors first)" if legacy else ""
    raise WeightsNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {str(path)!r}{hint}")


def read_tensors(files: list[Path], dtype: torch.dtype, progress: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of the files on the host, floating ones cast to `dtype`, with a tqdm bar."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    total = sum(len(h.keys()) for h in handles)
    tensors: dict[str, torch.Tensor] = {}
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for handle in handles:
            for name in handle.keys():
                t = handle.get_tensor(name)
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
                bar.update(1)
    return tensors


def fuse_projections(
    tensors: dict[str, torch.Tensor], config: ModelConfig, source: str
) -> dict[str, torch.Tensor]:
    """Replaces q/k/v_proj with one qkv_proj and gate/up_proj with one gate_up_proj per layer.

    Fused, each projection group is a single GEMM; the split points (q_size, kv_size,
    intermediate_size) are what `Attention` and `silu_and_mul` expect.
    """

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise MissingWeightError(f"tensor {name!r} is missing from {source}")
        return tensors.pop(name)

    for i in range(config.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        tensors[attn + "qkv_proj.weight"] = torch.cat([take(attn + f"{x}_proj.weight") for x in "qkv"])
        if config.attention_bias:
            tensors[attn + "qkv_proj.bias"] = torch.cat([take(attn + f"{x}_proj.bias") for x in "qkv"])
        tensors[mlp + "gate_up_proj.weight"] = torch.cat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]
        )
    return tensors


QUANTIZATIONS = ("none", "int8")
# The fused projections of every layer, and an untied output head: the weights a decode step
# streams. Embeddings are a row lookup (nothing to stream) and stay float, and so does a head tied
# to them (quantising it would add an int8 copy beside the float matrix the lookup needs). As in
# llama.cpp's Q8_0 files, which quantise output.weight too: on the 100M Llama the int8 head reads
# 18 MB less per step (decode step 6.4 -> 5.8 ms, 2 cores), and greedy agreement with float32 on
# the tiny checkpoints was unchanged (it added one flip of a 0.014-nat near-tie on the 100M).
QUANTIZED_HEAD = "lm_head.weight"
QUANTIZED_PROJECTIONS = (
    "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
)


def quantize_projections(
    tensors: dict[str, torch.Tensor], config: ModelConfig, group_size: int = INT8_GROUP_SIZE
) -> dict[str, torch.Tensor | Int8Weight]:
    """Replaces, in place, each layer's projection weights (after fusing) and an untied output
    head with `Int8Weight` (Q8_0: int8 with one float32 scale per `group_size` input features);
    a weight whose input features are not a multiple of `group_size` stays as it is. In place so
    that each float weight is freed as soon as its int8 copy exists."""
    out: dict[str, torch.Tensor | Int8Weight] = tensors  # type: ignore[assignment]
    for i in range(config.num_layers):
        for suffix in QUANTIZED_PROJECTIONS:
            name = f"model.layers.{i}.{suffix}"
            weight = out[name]
            if isinstance(weight, torch.Tensor) and weight.shape[1] % group_size == 0:
                out[name] = Int8Weight.quantize(weight, group_size)
    head = out.get(QUANTIZED_HEAD)
    if not config.tie_word_embeddings and isinstance(head, torch.Tensor) and head.shape[1] % group_size == 0:
        out[QUANTIZED_HEAD] = Int8Weight.quantize(head, group_size)
    return out


def load_model(
    path: str | Path,
    backend: Backend,
    dtype: str | torch.dtype = "auto",
    device_index: int = 0,
    progress: bool = True,
    quantization: str = "none",
) -> CausalLM:
    """Builds the family model for the checkpoint at `path` on ``backend.device(device_index)``.

    dtype: "auto" (config.json's ``dtype``/``torch_dtype``, else float32), "float32", "bfloat16",
    "float16" or a torch.dtype. quantization: "none", or "int8" for weight-only int8 projections
    and untied output head (`quantize_projections`); activations, norms and embeddings keep
    `dtype`, and logits are float32 as always.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"unsupported quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    path = check_model_dir(path)
    config = ModelConfig.from_pretrained(path)
    target = resolve_dtype(dtype, config)
    if target not in backend.capabilities.dtypes:
        supported = ", ".join(str(d).removeprefix("torch.") for d in backend.capabilities.dtypes)
        raise ValueError(
            f"backend {backend.name!r} does not support dtype {target}; choose one of {supported}"
        )
    files = weight_files(path)
    source = f"the checkpoint in {str(path)!r}"
    tensors = fuse_projections(read_tensors(files, target, progress), config, source)
    if quantization == "int8":
        # On the host, before the move: the device then only ever holds the int8 copy.
        tensors = quantize_projections(tensors, config)
    device = backend.device(device_index)
    tensors = backend.place_weights(tensors, device_index)
    return MODEL_CLASSES[config.family](config, backend, Weights(tensors, source), device)


def load_tokenizer(path: str | Path):
    """The checkpoint's Hugging Face tokenizer (chat template included), loaded offline."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {str(path)!r}"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
