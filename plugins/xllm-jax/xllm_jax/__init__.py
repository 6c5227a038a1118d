"""xllm-jax: an out-of-tree xllm backend whose ops are jax.numpy kernels compiled by jax.jit.

The engine and the models stay torch: tensors cross into JAX and back through DLPack at every
HAL op (zero-copy on the CPU device where alignment allows), the KV cache stays a torch tensor
that `reshape_and_cache` updates in place. Registered as ``jax`` through the ``xllm.backends``
entry-point group (see pyproject.toml). Importing this package imports neither jax nor torch:
`xllm backends` probes every backend on every machine.
"""
