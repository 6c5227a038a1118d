"""Linear layers of the CPU backend: decode-sized GEMMs as a batched GEMM over weight slices.

A decode step multiplies a few rows by every weight matrix, so it is bound by how fast the
weights stream from memory. torch's ``F.linear`` computes ``x @ W.T`` through MKL's GEMM/GEMV
with the weight transposed; for few rows that path runs on one core and reads about 18-24 GB/s
on the 2-core CI machine. Viewing W [out, in] as [cores, out/cores, in] (free: the rows are
contiguous) and computing ``bmm(W_slices, x.T)`` runs the slices on all cores with the weight in
its natural row-major order: measured on a 100M-parameter Llama's projections, 3x faster at one
row and still 1.3x at 64 rows; from a few hundred rows on (prefill) both paths are compute
bound and equal, so large batches keep ``F.linear``. `xllm bench throughput` reports the decode
step this gives against the memory-bandwidth floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MAX_BATCHED_ROWS = 256


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    parts = torch.get_num_threads()
    out_features = weight.shape[0]
    if (
        parts < 2
        or x.dtype != torch.float32  # measured for float32; half types keep oneDNN's own path
        or x.shape[0] > _MAX_BATCHED_ROWS
        or out_features % parts
        or not weight.is_contiguous()
    ):
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    slices = weight.view(parts, out_features // parts, weight.shape[1])
    out = torch.bmm(slices, x.t().unsqueeze(0).expand(parts, -1, -1))  # [parts, out/parts, rows]
    # The product is column-major; later ops want row-major tokens (a copy of rows x out only).
    out = out.permute(2, 0, 1).reshape(rows, out_features).contiguous()
    return out + bias if bias is not None else out
