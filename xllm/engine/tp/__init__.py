"""Tensor parallelism: one scheduler in the driver, one worker process per rank (see executor)."""

from xllm.engine.tp.executor import TensorParallelExecutor, WorkerDiedError, WorkerStepError

__all__ = ["TensorParallelExecutor", "WorkerDiedError", "WorkerStepError"]
