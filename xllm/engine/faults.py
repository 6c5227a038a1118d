"""`StepFaults`: when a failing model step is the step's problem and when the engine must stop.

A step can fail for reasons that belong to its batch (an allocation that did not fit, a shape a
kernel rejected): failing those requests and carrying on is right. It can also fail because the
device is broken, and then every later step fails too; carrying on would fail every request
forever while the server looks healthy (vLLM issue #7633). So the engine stops, with
`EngineDeadError`, on the first failure the backend classifies as fatal
(`Backend.is_fatal_error`) or on the K-th failure in a row (`max_consecutive_step_failures`); a
successful step resets the count.
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm.engine.errors import EngineDeadError


def describe(exc: BaseException) -> str:
    """``Type: message``, the form error texts carry."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(slots=True)
class StepFaults:
    """Failed-step bookkeeping of one engine; `dead` is set once it has stopped for good."""

    max_consecutive: int
    consecutive: int = 0  # failed steps since the last successful one
    total: int = 0  # failed steps over the engine's life (for /metrics)
    dead: EngineDeadError | None = None

    def record_success(self) -> None:
        self.consecutive = 0

    def record_failure(self, exc: Exception, fatal: bool) -> EngineDeadError | None:
        """Counts a failed step; returns the error the engine dies with, or None to carry on."""
        self.total += 1
        self.consecutive += 1
        if fatal:
            reason = f"a fatal device error: {describe(exc)}"
        elif self.consecutive >= self.max_consecutive:
            reason = f"{self.consecutive} consecutive failed model steps; the last: {describe(exc)}"
        else:
            return None
        self.dead = EngineDeadError(f"the engine stopped after {reason}")
        self.dead.__cause__ = exc
        return self.dead

    def check_alive(self) -> None:
        """Raises a fresh `EngineDeadError` (same message and cause) once the engine has died."""
        if self.dead is not None:
            raise EngineDeadError(str(self.dead)) from self.dead.__cause__
