"""`LLM`: offline batched generation, vLLM's interface (`LLM(model=...).generate(prompts, params)`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from xllm.engine.config import EngineConfig
from xllm.engine.llm_engine import LLMEngine, PromptInput
from xllm.engine.outputs import RequestOutput
from xllm.engine.sampling_params import SamplingParams
from xllm.hal import Backend


class LLM:
    def __init__(
        self,
        model: str | None = None,
        backend: str | Backend | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_memory: int | str | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        **kwargs: object,
    ) -> None:
        """`backend`: a registry name (opened with ``backend_options``), a `Backend` instance to
        run on as it is, or None for ``$XLLM_BACKEND`` / the first available backend. Every
        other keyword is an `EngineConfig` field."""
        self.config = EngineConfig(
            model=None if model is None else str(model),
            backend=backend,
            dtype=dtype,
            max_model_len=max_model_len,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **kwargs,
        )
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (a string, a token-id list, or a list of either) and
        returns the outputs in prompt order."""
        prompt_list = self._as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompt_list)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        ids = []
        try:
            for prompt, params, prio in zip(prompt_list, params_list, priorities, strict=True):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, params, priority=prio)
                ids.append(rid)
        except Exception:
            for rid in ids:  # a bad prompt rejects the call without leaking the others' blocks
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            for conv in conversations
        ]
        # The template already holds the special tokens; encode without adding them again.
        token_prompts = [
            {"prompt": p, "prompt_token_ids": self.tokenizer(p, add_special_tokens=False).input_ids}
            for p in prompts
        ]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(finished) < len(ids):
                if not self.engine.has_unfinished_requests():
                    break
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in finished:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        errors = [o.error for o in finished.values() if o.error]
        if errors:
            raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
        return [finished[rid] for rid in ids]

    @staticmethod
    def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return prompts
