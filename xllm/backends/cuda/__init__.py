"""NVIDIA GPU backend: Triton kernels for the HAL ops, CUDA graphs, CUDA virtual memory, NCCL.

Importing this package imports neither triton nor cuda-python; `backend.CudaBackend.probe`
reports why the backend cannot run here. Kernels live in `kernels/`, one module per op family.
"""
