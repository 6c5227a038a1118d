"""Backends: one package per accelerator family, each importing `xllm.hal` only."""
