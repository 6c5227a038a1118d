"""Triton kernels of the CUDA backend, one module per op family.

These modules import triton at their top; only `xllm.backends.cuda.backend` imports them, and only
after its probe found triton (and, for interpret mode, set ``TRITON_INTERPRET=1``).
"""
