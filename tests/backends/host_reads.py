"""Metadata tensors that fail a test when a backend reads their values back on the host.

On an accelerator every such read (``tolist``, ``item``, ``int(t)``, ``bool(t)``...) waits for the
device. `device_only` wraps the length tensors of an `AttentionMetadata` in `DeviceOnlyTensor`;
torch propagates the subclass through every op, so a read of anything computed from them fails
too, while device work on them runs as usual.
"""

from __future__ import annotations

import dataclasses

import torch

from xllm.hal import AttentionMetadata


class HostReadError(AssertionError):
    pass


def _refuse(self, *args, **kwargs):
    raise HostReadError("a backend read device metadata back on the host")


class DeviceOnlyTensor(torch.Tensor):
    tolist = item = numpy = _refuse
    __bool__ = __int__ = __float__ = __index__ = _refuse


def plain(t: torch.Tensor) -> torch.Tensor:
    """The same tensor as a plain torch.Tensor (for the stand-in device and for assertions)."""
    return t.as_subclass(torch.Tensor) if isinstance(t, DeviceOnlyTensor) else t


def device_only(md: AttentionMetadata, *names: str) -> AttentionMetadata:
    """A copy of `md` whose named tensor fields (default: the two length tensors) refuse host reads."""
    names = names or ("query_start_loc", "seq_lens")
    return dataclasses.replace(md, **{n: getattr(md, n).as_subclass(DeviceOnlyTensor) for n in names})
