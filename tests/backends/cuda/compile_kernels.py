"""Compiles every CUDA-backend kernel for a GPU architecture without a GPU (run as a script).

The interpreter runs kernels as NumPy and so cannot tell whether Triton would *compile* them:
type errors in loop-carried values, dot shapes below 16, constexpr misuse, shared memory beyond
the hardware's. `triton.compile` with an explicit `GPUTarget` runs the real pipeline down to a
cubin with the ptxas that ships inside the triton wheel, no driver needed. Launch parameters
come from the same helpers the backend uses (`attention_tiles`), so what compiles here is what
launches there.

Usage: ``python compile_kernels.py SM [MAX_SHARED_BYTES]``; prints one line per kernel variant
and exits non-zero on the first failure. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from xllm.backends.cuda.kernels import activation, attention, cache, rms_norm, rotary  # noqa: E402

TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_one(
    target: GPUTarget, fn, types: dict[str, str], consts: dict, max_shared: int, **options
) -> None:
    sig = {name: ("constexpr" if name in consts else types.get(name, "i32")) for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options=options or None)
    shared = kernel.metadata.shared
    print(f"ok {fn.__name__} shared={shared} {consts}", flush=True)
    if shared > max_shared:
        raise SystemExit(f"{fn.__name__} {consts} needs {shared} bytes of shared memory > {max_shared}")


def main() -> None:
    sm = int(sys.argv[1])
    max_shared = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 30
    target = GPUTarget("cuda", sm, 32)
    for dtype, t in TL.items():
        att_types = {n: f"*{t}" for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
        att_types.update({n: "*fp32" for n in ("part_acc_ptr", "part_m_ptr", "part_l_ptr", "qk_scale")})
        att_types.update({n: "*i32" for n in ("query_start_loc_ptr", "seq_lens_ptr", "block_tables_ptr")})
        att_types["qk_scale"] = "fp32"
        for head_dim, group, qlen, splits, sliding in (
            (128, 4, 512, 1, False),  # prefill, GQA 4
            (64, 1, 512, 1, True),  # prefill, MHA, sliding window
            (128, 8, 1, 1, False),  # decode
            (128, 4, 1, 8, False),  # split-KV decode
            (256, 2, 512, 1, False),  # wide heads (Gemma)
            (80, 3, 7, 1, False),  # odd head_dim and group
        ):
            head_pad, block_m, block_q, tile_n, stages = attention.attention_tiles(
                head_dim, group, qlen, dtype, False
            )
            consts = dict(
                HEAD_DIM=head_dim,
                HEAD_PAD=head_pad,
                GROUP=group,
                BLOCK_Q=block_q,
                BLOCK_M=block_m,
                TILE_N=tile_n,
                NUM_SPLITS=splits,
                ONE_BLOCK_PER_SEQ=qlen <= block_q,
                SLIDING=sliding,
                UPCAST=False,
                IEEE=dtype == torch.float32,
            )
            compile_one(
                target, attention.paged_attention_kernel, att_types, consts, max_shared, num_stages=stages
            )
            if head_dim == 80:  # int64 metadata (the contract allows either index width)
                i64 = {n: "*i64" for n in ("query_start_loc_ptr", "seq_lens_ptr", "block_tables_ptr")}
                compile_one(
                    target,
                    attention.paged_attention_kernel,
                    {**att_types, **i64},
                    {**consts, "ONE_BLOCK_PER_SEQ": False},
                    max_shared,
                    num_stages=stages,
                )
        compile_one(
            target,
            attention._combine_splits_kernel,
            {"out_ptr": f"*{t}", **{n: "*fp32" for n in ("part_acc_ptr", "part_m_ptr", "part_l_ptr")}},
            dict(HEAD_DIM=80, HEAD_PAD=128, NUM_SPLITS=5, SPLITS_PAD=8, INTERPRET=False),
            max_shared,
        )
        compile_one(
            target,
            rms_norm._rms_norm_kernel,
            {**{n: f"*{t}" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "h_ptr")}, "eps": "fp32"},
            dict(BLOCK=8192, HAS_RESIDUAL=True, INTERPRET=False),
            max_shared,
            num_warps=16,
        )
        compile_one(
            target,
            rotary._rotary_kernel,
            {"positions_ptr": "*i64", "q_ptr": f"*{t}", "k_ptr": f"*{t}", "cos_sin_ptr": "*fp32"},
            dict(ROT_HALF=64, HALF_PAD=64, QH_PAD=32, KH_PAD=8, NEOX=dtype != torch.float16, INTERPRET=False),
            max_shared,
        )
        for act in (activation.ACT_SILU, activation.ACT_GELU_ERF, activation.ACT_GELU_TANH):
            compile_one(
                target,
                activation._gated_kernel,
                {"x_ptr": f"*{t}", "out_ptr": f"*{t}"},
                dict(ACT=act, BLOCK=1024, INTERPRET=False),
                max_shared,
            )
        compile_one(
            target,
            cache._reshape_and_cache_kernel,
            {**{n: f"*{t}" for n in ("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr")}, "slot_ptr": "*i64"},
            dict(HEAD_DIM=128, HEADS_PAD=8, DIM_PAD=128),
            max_shared,
        )
    print("all kernels compiled")


if __name__ == "__main__":
    main()
