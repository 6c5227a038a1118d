"""Model families (Llama, Qwen2, Qwen3, Mistral) written as plain modules over the HAL ops.

`load_model` turns a Hugging Face checkpoint directory into a `CausalLM` whose `forward` runs a
flattened batch against the paged KV cache; `make_model` writes small deterministic checkpoints
for tests and demos; `default_model_path` gives the embedded default model.
"""

from xllm.models.causal_lm import CausalLM
from xllm.models.config import SUPPORTED_FAMILIES, ModelConfig, ModelConfigError, load_generation_config
from xllm.models.default_model import default_model_path
from xllm.models.layers import MissingWeightError
from xllm.models.loader import WeightsNotFoundError, load_model, load_tokenizer
from xllm.models.make_model import make_model

__all__ = [
    "SUPPORTED_FAMILIES",
    "CausalLM",
    "MissingWeightError",
    "ModelConfig",
    "ModelConfigError",
    "WeightsNotFoundError",
    "default_model_path",
    "load_generation_config",
    "load_model",
    "load_tokenizer",
    "make_model",
]
