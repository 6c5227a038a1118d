"""XLA settings the HAL's numerics need, applied before this backend's first JAX computation.

By default XLA may drop a rounding that a program asks for (`--xla_allow_excess_precision`,
on by default, lets its simplifier remove an f32 -> bf16 -> f32 convert pair and keep the wider
value). The HAL contract names its rounding points (RMSNorm rounds the normalised value to the
activation dtype before the weight multiplies it, as Hugging Face does), and with the default the
bfloat16 RMSNorm cases differ from the CPU reference by NMSE ~9e-6 and the bfloat16 whole-model
case by ~7e-4; with it off RMSNorm is exact and the model case ~1e-14..5e-8. XLA reads the
variable when its CPU client starts, at the first JAX computation in the process, so every
kernel module imports this one first; it is not imported by `backend.py`'s module import, so
`xllm backends` leaves the environment alone. A value the user set is kept.
"""

from __future__ import annotations

import os

_FLAG = "--xla_allow_excess_precision=false"

if "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
