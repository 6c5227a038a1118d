"""The router's `slo` role balancer: moves instances between prefill and decode on its own.

The original system flips prefill and decode instances from its TTFT/TPOT predictors; this does
the same from what the router observes. Every relayed stream reports its time to first token and
its time per output token (`observe`); every `interval_s` the balancer looks at the 90th
percentiles of the last `window_s` against ``--slo ttft_ms=..,tpot_ms=..``:

- TTFT over its target while TPOT is within its own: prompts wait for prefill capacity, so the
  least-loaded decode instance becomes a prefill instance (if more than one decode is left);
- TPOT over while TTFT is within: decoding is the bottleneck, a prefill instance becomes decode;
- both over, or both within: nothing (more instances, not other roles, would help).

A switch goes through the router's ordinary role switch (no new placements, the old role's
in-flight work finishes, then the instance re-registers), is logged and counted with
``by="slo"``, and is followed by `cooldown_s` without another, so the pools do not oscillate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xllm.cluster import policies
from xllm.cluster.registry import Role

if TYPE_CHECKING:
    from xllm.cluster.router import RouterState

logger = logging.getLogger("xllm.cluster")


@dataclass(frozen=True, slots=True)
class SloTargets:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> SloTargets:
        """'ttft_ms=500,tpot_ms=50' (either may be left out)."""
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or key not in ("ttft_ms", "tpot_ms"):
                raise ValueError(f"bad --slo item {part!r}: use ttft_ms=MS and/or tpot_ms=MS")
            values[key] = float(value)
            if not values[key] > 0:
                raise ValueError(f"--slo {key} must be positive")
        return cls(**values)


def p90(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


class SloBalancer:
    def __init__(
        self,
        targets: SloTargets,
        window_s: float = 20.0,
        interval_s: float = 5.0,
        cooldown_s: float = 30.0,
        min_samples: int = 8,
    ) -> None:
        self.targets = targets
        self.window_s = window_s
        self.interval_s = interval_s
        self.cooldown_s = cooldown_s
        self.min_samples = min_samples
        self.samples: deque[tuple[float, float | None, float | None]] = deque()  # (time, ttft_s, tpot_s)
        self.last_switch = -math.inf

    def observe(self, ttft_s: float | None, tpot_s: float | None, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, ttft_s, tpot_s))

    def decide(self, num_prefill: int, num_decode: int, now: float | None = None) -> tuple[Role, Role] | None:
        """(from role, to role) of the switch to make now, or None."""
        now = time.monotonic() if now is None else now
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        if now - self.last_switch < self.cooldown_s or len(self.samples) < self.min_samples:
            return None
        ttft = p90([s[1] for s in self.samples if s[1] is not None]) * 1000.0
        tpot = p90([s[2] for s in self.samples if s[2] is not None]) * 1000.0
        t = self.targets
        ttft_over = t.ttft_ms is not None and ttft > t.ttft_ms
        tpot_over = t.tpot_ms is not None and tpot > t.tpot_ms
        if ttft_over and not tpot_over and num_decode > 1:
            return Role.DECODE, Role.PREFILL
        if tpot_over and not ttft_over and num_prefill > 1:
            return Role.PREFILL, Role.DECODE
        return None

    async def run(self, state: RouterState) -> None:
        """The balancing loop (a task of the router's lifespan)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step(state)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("slo role balancing failed this round", exc_info=True)

    async def step(self, state: RouterState) -> bool:
        members = state.up_members()
        prefill = [m for m in members if state.role_of(m) is Role.PREFILL]
        decode = [m for m in members if state.role_of(m) is Role.DECODE]
        decision = self.decide(len(prefill), len(decode))
        if decision is None:
            return False
        source, target = decision
        pool = [state.with_placed(m) for m in (decode if source is Role.DECODE else prefill)]
        chosen = policies.least_loaded(pool)
        if chosen is None:
            return False
        logger.info(
            "slo: %s over target (ttft %s ms, tpot %s ms); switching %s from %s to %s",
            "TTFT" if target is Role.PREFILL else "TPOT",
            self.targets.ttft_ms,
            self.targets.tpot_ms,
            chosen.info.id,
            source.value,
            target.value,
        )
        self.last_switch = time.monotonic()
        self.samples.clear()  # what was measured before the switch says nothing about after it
        await state.switch_role(chosen.info.id, target, by="slo")
        return True
