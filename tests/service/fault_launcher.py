"""Runs the `xllm` command line with a device fault waiting in the CPU backend, for the e2e tests.

    python tests/service/fault_launcher.py MARKER KIND serve --model DIR ...

Once the file MARKER exists, every attention call of the CPU backend raises: KIND "fatal" raises
`DeviceFaultError` (the engine stops at the first failure), "step" a plain RuntimeError (each
failing step fails its own requests until --max-consecutive-step-failures in a row stop the
engine). KIND "slow" raises nothing but sleeps 10 ms per attention call, so that a test can
catch a stream mid-way (the cluster's failover tests kill the instance then). The product has no fault switch: this wraps the real op from outside, then runs the
normal entry point, so everything else is exactly `xllm serve`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

KINDS = ("fatal", "step", "slow")
SLOW_S = 0.01


def main(argv: list[str]) -> int:
    marker, kind, *cli_args = argv
    if kind not in KINDS:
        raise SystemExit(f"fault_launcher: KIND must be one of {KINDS}, got {kind!r}")
    from xllm.backends.cpu.backend import CpuBackend
    from xllm.cli.main import main as xllm_main
    from xllm.hal.errors import DeviceFaultError

    marker_path = Path(marker)
    real_attention = CpuBackend._attention

    def attention(self: CpuBackend, *args: object, **kwargs: object) -> object:
        if marker_path.exists():
            if kind == "slow":
                time.sleep(SLOW_S)
                return real_attention(self, *args, **kwargs)
            if kind == "fatal":
                raise DeviceFaultError("injected device fault: device lost")
            raise RuntimeError("injected step fault")
        return real_attention(self, *args, **kwargs)

    CpuBackend._attention = attention  # type: ignore[method-assign]
    return xllm_main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
