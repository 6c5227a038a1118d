"""What the driver sends its tensor-parallel workers: the start-up spec and each step's inputs.

A step travels as the host lists `prepare_inputs` built (a few integers per token) plus, per
scheduled sequence, the little of it that sampling reads (`SeqView`); the Sequence objects
themselves (with their request, detokenizer and block bookkeeping) stay in the driver.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xllm.engine.config import EngineConfig
from xllm.engine.model_runner import StepInputs
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import ScheduledSequence


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    rank: int
    world_size: int
    init_method: str  # torch.distributed rendezvous of the workers' communicator
    backend: str  # a registry name: each worker opens its own backend
    config: EngineConfig  # with `backend` as the name, so it pickles
    model_path: str
    dtype: str  # resolved by the driver, so every rank runs the same one
    num_threads: int  # torch intra-op threads: the host's cores are split between the ranks


@dataclass(frozen=True, slots=True)
class SeqView:
    """The fields of a `Sequence` that `ModelRunner._sample` and `_prompt_logprobs` read."""

    params: SamplingParams
    seed: int
    num_output_tokens: int
    # Only sent when a penalty needs them (they grow with the sequence).
    prompt_token_ids: list[int] | None
    output_token_ids: list[int] | None


@dataclass(frozen=True, slots=True)
class ScheduledView:
    seq: SeqView


def view_step(
    inputs: StepInputs, scheduled: list[ScheduledSequence]
) -> tuple[StepInputs, list[ScheduledView]]:
    """`inputs` and `scheduled` with every Sequence replaced by its `SeqView`."""
    views = []
    by_id: dict[int, SeqView] = {}
    for item in scheduled:
        seq = item.seq
        penalties = seq.params.uses_penalties
        view = SeqView(
            params=seq.params,
            seed=seq.seed,
            num_output_tokens=seq.num_output_tokens,
            prompt_token_ids=seq.prompt_token_ids if penalties else None,
            output_token_ids=seq.output_token_ids if penalties else None,
        )
        by_id[id(seq)] = view
        views.append(ScheduledView(view))
    sampling = [by_id[id(seq)] for seq in inputs.sampling_seqs]
    return dataclasses.replace(inputs, sampling_seqs=sampling), views  # type: ignore[arg-type]
