"""The `Backend` contract: everything the engine may ask of an accelerator.

Public methods are the contract. They check their arguments once, here (so every backend rejects
bad input with the same ValueError), then call the matching ``_method`` that a backend implements.
A new accelerator subclasses `Backend`, fills in the abstract ``_`` methods and the class
attributes, and registers itself (see `xllm.hal.registry`); nothing above the HAL changes.

Op semantics are defined by the CPU reference backend and pinned down by the conformance suite;
the docstrings below say what each op computes in words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from xllm.hal.comm import Communicator
from xllm.hal.errors import DeviceFaultError, NotSupportedError
from xllm.hal.graphs import GraphInput, GraphRunner
from xllm.hal.kv_transfer import KVTransferEngine
from xllm.hal.memory import MemInfo, XTensor
from xllm.hal.metadata import AttentionMetadata, SampleOutput, SamplingMetadata
from xllm.hal.streams import Event, Stream
from xllm.hal.validation import INDEX_DTYPES, check_dim, check_same_dtype, check_tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Input features per int8 scale (llama.cpp's Q8_0 block): `quantize_int8` and `linear_int8`.
INT8_GROUP_SIZE = 32


def quantize_int8(
    weight: torch.Tensor, group_size: int = INT8_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int8 of a [out, in] weight with one scale per `group_size`
    consecutive input features: ``(qweight int8 [out, in], scales float32 [out, in / group_size])``.

    ``scale = max|w| / 127`` over the group and ``q = round(w / scale)``, so every q is in
    [-127, 127] and each weight is off by at most half a scale. An all-zero group gets scale 0 (and
    q 0): it dequantises to exact zeros. Computed in float32 whatever the weight's dtype.
    """
    if weight.dim() != 2 or weight.shape[1] % group_size:
        raise ValueError(
            f"quantize_int8: need a [out, in] weight with in a multiple of {group_size}, "
            f"got {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scales = groups.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # 0/0 would be NaN
    qweight = torch.round(groups / safe).clamp_(-127, 127).to(torch.int8)
    return qweight.reshape(out_features, in_features), scales.reshape(out_features, -1).contiguous()


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 [out, in] weight ``qweight * scales`` that `linear_int8` multiplies by."""
    out_features, in_features = qweight.shape
    groups = qweight.reshape(out_features, in_features // group_size, group_size).float()
    return (groups * scales.unsqueeze(-1)).reshape(out_features, in_features)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, asked instead of testing device names above the HAL."""

    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    # The dtypes it computes at full speed: `dtypes` it accepts may be emulated (bfloat16 on an
    # AVX2-only CPU runs many times slower than float32), so dtype="auto" only picks these.
    native_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    # True when its tensors live in host memory that the OS and other processes share (the CPU):
    # the engine then sizes the KV cache conservatively instead of filling the device.
    shares_host_memory: bool = False
    graph_capture: bool = False  # True when replay is a real device graph, not eager re-execution
    virtual_memory: bool = False  # xTensor pages backed by real virtual-memory mapping
    collective_backend: str = "gloo"  # the torch.distributed backend its Communicator uses
    kv_cache_layout: str = "NHD"  # [num_blocks, block_size, num_kv_heads, head_dim]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        return {
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "native_dtypes": [str(d).removeprefix("torch.") for d in self.native_dtypes],
            "graph_capture": self.graph_capture,
            "virtual_memory": self.virtual_memory,
            "shares_host_memory": self.shares_host_memory,
            "collective_backend": self.collective_backend,
            "kv_cache_layout": self.kv_cache_layout,
        }


class Backend(ABC):
    name: ClassVar[str]
    device_type: ClassVar[str]  # the torch device string of its tensors: "cpu", "cuda", "npu"
    CAPABILITIES: ClassVar[Capabilities] = Capabilities()

    # ------------------------------------------------------------------ identity

    @classmethod
    @abstractmethod
    def probe(cls, **options: object) -> str | None:
        """None when the backend can run here, else the one-line reason it cannot.

        Must not raise and must not import optional heavy dependencies at module import time:
        `xllm backends` probes every backend on every machine.
        """

    @classmethod
    def is_available(cls, **options: object) -> bool:
        return cls.probe(**options) is None

    @classmethod
    def unavailable_reason(cls, **options: object) -> str | None:
        return cls.probe(**options)

    @classmethod
    def device_count(cls) -> int:
        """Number of devices of this kind visible to the process (0 when unavailable)."""
        return 0

    @property
    def capabilities(self) -> Capabilities:
        return self.CAPABILITIES

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    # ------------------------------------------------------------------ ops

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``, computed in float32.

        With `residual`, first forms ``h = x + residual`` (in x's dtype, as Hugging Face does) and
        returns ``(rms_norm(h), h)``, so a decoder layer needs one call per norm. Inputs are not
        modified. x: [..., hidden]; weight: [hidden].
        """
        op = "rms_norm"
        check_tensor(op, "x", x, ndim=(2, 3), dtypes=self.capabilities.dtypes)
        check_tensor(op, "weight", weight, ndim=1, dtypes=self.capabilities.dtypes)
        check_dim(op, "weight", weight.shape[0], x.shape[-1], "length")
        if residual is not None:
            check_tensor(op, "residual", residual, dtypes=(x.dtype,))
            if residual.shape != x.shape:
                raise ValueError(
                    f"{op}: argument 'residual' has shape {tuple(residual.shape)}, expected {tuple(x.shape)}"
                )
        if not eps > 0:
            raise ValueError(f"{op}: argument 'eps' must be positive, got {eps}")
        return self._rms_norm(x, weight, float(eps), residual)

    def rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary position embedding of q and k, possibly in place; returns (q, k).

        q: [T, num_q_heads, head_dim]; k: [T, num_kv_heads, head_dim]; positions: [T];
        cos_sin_cache: [max_position, rot_dim] float32 holding cos in its first rot_dim/2 columns
        and sin in the rest (vLLM's layout). The first rot_dim dims of each head rotate; with
        `neox_style` the pairs are (i, i + rot_dim/2) (Llama/Qwen), else interleaved (2i, 2i+1)
        (GPT-J). The product is formed in float32 and cast back to q's dtype.
        """
        op = "rotary_embedding"
        check_tensor(op, "positions", positions, ndim=1, dtypes=INDEX_DTYPES)
        check_tensor(op, "q", q, ndim=3, dtypes=self.capabilities.dtypes)
        check_tensor(op, "k", k, ndim=3, dtypes=(q.dtype,))
        check_tensor(op, "cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES)
        check_dim(op, "q", q.shape[0], positions.shape[0], "token count")
        check_dim(op, "k", k.shape[0], positions.shape[0], "token count")
        check_dim(op, "k", k.shape[2], q.shape[2], "head_dim")
        rot_dim = cos_sin_cache.shape[1]
        if rot_dim % 2 or rot_dim > q.shape[2]:
            raise ValueError(
                f"{op}: argument 'cos_sin_cache' has rot_dim {rot_dim}; need an even rot_dim <= head_dim {q.shape[2]}"
            )
        return self._rotary_embedding(positions, q, k, cos_sin_cache, bool(neox_style))

    def embedding(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Rows of `weight` [vocab, hidden] for `input_ids` [T] -> [T, hidden]; an id outside the
        vocabulary raises IndexError."""
        op = "embedding"
        check_tensor(op, "input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES)
        check_tensor(op, "weight", weight, ndim=2, dtypes=self.capabilities.dtypes)
        return self._embedding(input_ids, weight)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU gate: ``silu(x[..., :d]) * x[..., d:]`` for x: [..., 2d]."""
        self._check_gated("silu_and_mul", x)
        return self._silu_and_mul(x)

    def gelu_and_mul(self, x: torch.Tensor, approximate: Literal["none", "tanh"] = "none") -> torch.Tensor:
        """GeGLU gate: ``gelu(x[..., :d]) * x[..., d:]`` (exact erf or tanh approximation)."""
        self._check_gated("gelu_and_mul", x)
        if approximate not in ("none", "tanh"):
            raise ValueError(
                f"gelu_and_mul: argument 'approximate' must be 'none' or 'tanh', got {approximate!r}"
            )
        return self._gelu_and_mul(x, approximate)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias``: x [T, in], weight [out, in] (Hugging Face layout), bias [out].

        Linear layers are plain torch matmuls by default; a backend overrides `_linear` only where
        it has something better (the CPU backend splits decode-sized GEMVs across its cores).
        """
        op = "linear"
        check_tensor(op, "x", x, ndim=2, dtypes=self.capabilities.dtypes)
        check_tensor(op, "weight", weight, ndim=2, dtypes=(x.dtype,))
        check_dim(op, "weight", weight.shape[1], x.shape[1], "input features")
        if bias is not None:
            check_tensor(op, "bias", bias, ndim=1, dtypes=(x.dtype,))
            check_dim(op, "bias", bias.shape[0], weight.shape[0], "length")
        return self._linear(x, weight, bias)

    def linear_int8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = INT8_GROUP_SIZE,
    ) -> torch.Tensor:
        """`linear` with a weight-only int8 weight (llama.cpp's Q8_0 layout): ``x @ W.T + bias``
        where ``W = qweight * scales`` per group, see `dequantize_int8`.

        x [T, in] in a float dtype; qweight int8 [out, in]; scales float32 [out, in / group_size],
        one per `group_size` consecutive input features of a row; bias [out] in x's dtype. The
        result is in x's dtype. The default dequantises W (formed in float32, then rounded to x's
        dtype) and calls `_linear`, so every backend runs it; a backend overrides `_linear_int8`
        with a kernel that reads the int8 weight directly (the CPU backend does, for decode).
        """
        op = "linear_int8"
        check_tensor(op, "x", x, ndim=2, dtypes=self.capabilities.dtypes)
        check_tensor(op, "qweight", qweight, ndim=2, dtypes=(torch.int8,))
        check_tensor(op, "scales", scales, ndim=2, dtypes=(torch.float32,))
        check_dim(op, "qweight", qweight.shape[1], x.shape[1], "input features")
        if not (isinstance(group_size, int) and group_size > 0 and qweight.shape[1] % group_size == 0):
            raise ValueError(
                f"{op}: argument 'group_size' must be a positive divisor of the {qweight.shape[1]} "
                f"input features, got {group_size!r}"
            )
        if tuple(scales.shape) != (qweight.shape[0], qweight.shape[1] // group_size):
            raise ValueError(
                f"{op}: argument 'scales' has shape {tuple(scales.shape)}, expected "
                f"{(qweight.shape[0], qweight.shape[1] // group_size)} (out, in / group_size)"
            )
        if bias is not None:
            check_tensor(op, "bias", bias, ndim=1, dtypes=(x.dtype,))
            check_dim(op, "bias", bias.shape[0], qweight.shape[0], "length")
        return self._linear_int8(x, qweight, scales, bias, group_size)

    def reshape_and_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Writes token t's k/v into cache slot ``slot_mapping[t]`` (block, offset = divmod(slot,
        block_size)); slots < 0 are skipped. k, v: [T, num_kv_heads, head_dim]; caches:
        [num_blocks, block_size, num_kv_heads, head_dim]. Writes in place, returns nothing."""
        op = "reshape_and_cache"
        self._check_kv(op, k, v, k_cache, v_cache)
        check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES)
        check_dim(op, "slot_mapping", slot_mapping.shape[0], k.shape[0], "length")
        self._reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Causal paged attention for a mixed prefill/decode batch; returns [T, num_q_heads, head_dim].

        q: [T, num_q_heads, head_dim]. k, v are the new tokens' keys/values, already written to
        the caches by `reshape_and_cache` (a backend may read them instead of the cache). Query
        heads map onto KV heads in groups (GQA/MQA): head h uses KV head h // (num_q_heads //
        num_kv_heads). See `AttentionMetadata` for positions, masking and the sliding window.
        Softmax is computed in float32.
        """
        op = "attention"
        check_tensor(op, "q", q, ndim=3, dtypes=self.capabilities.dtypes)
        self._check_kv(op, k, v, k_cache, v_cache)
        check_same_dtype(op, "q", q, k=k)
        check_dim(op, "q", q.shape[0], k.shape[0], "token count")
        check_dim(op, "q", q.shape[2], k.shape[2], "head_dim")
        if q.shape[1] % k.shape[1]:
            raise ValueError(
                f"{op}: argument 'q' has {q.shape[1]} heads, not a multiple of the {k.shape[1]} KV heads"
            )
        md = metadata
        if not isinstance(md, AttentionMetadata):
            raise ValueError(f"{op}: argument 'metadata' must be AttentionMetadata, got {type(md).__name__}")
        check_tensor(op, "metadata.query_start_loc", md.query_start_loc, ndim=1, dtypes=INDEX_DTYPES)
        check_tensor(op, "metadata.seq_lens", md.seq_lens, ndim=1, dtypes=INDEX_DTYPES)
        check_tensor(op, "metadata.block_tables", md.block_tables, ndim=2, dtypes=INDEX_DTYPES)
        check_tensor(op, "metadata.slot_mapping", md.slot_mapping, ndim=1, dtypes=INDEX_DTYPES)
        num_seqs = md.seq_lens.shape[0]
        check_dim(op, "metadata.query_start_loc", md.query_start_loc.shape[0], num_seqs + 1, "length")
        check_dim(op, "metadata.block_tables", md.block_tables.shape[0], num_seqs, "row count")
        check_dim(op, "metadata.slot_mapping", md.slot_mapping.shape[0], q.shape[0], "length")
        # Host copies are checked by length only: comparing values would cost the device read
        # they exist to avoid.
        if md.query_start_loc_host is not None:
            check_dim(
                op, "metadata.query_start_loc_host", len(md.query_start_loc_host), num_seqs + 1, "length"
            )
        if md.seq_lens_host is not None:
            check_dim(op, "metadata.seq_lens_host", len(md.seq_lens_host), num_seqs, "length")
        if md.sliding_window is not None and md.sliding_window <= 0:
            raise ValueError(
                f"{op}: argument 'metadata.sliding_window' must be positive or None, got {md.sliding_window}"
            )
        if md.max_seq_len > md.block_tables.shape[1] * k_cache.shape[1]:
            raise ValueError(
                f"{op}: argument 'metadata.block_tables' covers {md.block_tables.shape[1] * k_cache.shape[1]} tokens, "
                f"fewer than max_seq_len {md.max_seq_len}"
            )
        return self._attention(q, k, v, k_cache, v_cache, md)

    def processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
        """float32 [B, V] logits after penalties, temperature, top-k, top-p and min-p; removed
        tokens are -inf. Greedy rows get penalties only. ``softmax`` of it is the distribution
        `sample` draws from; the conformance suite compares it across backends."""
        self._check_sampling("processed_logits", logits, sampling)
        return self._processed_logits(logits, sampling)

    def sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput:
        """Samples one token per row of logits [B, V] (see `SamplingMetadata`) with logprobs."""
        self._check_sampling("sample", logits, sampling)
        return self._sample(logits, sampling)

    # ------------------------------------------------------------------ memory

    def place_weights(self, tensors: dict[str, Any], device_index: int = 0) -> dict[str, Any]:
        """A model's weights, read on the host, where the model will use them: on the device by
        default. Takes the tensors out of `tensors` as it goes, so the host copies can be freed.
        Values are tensors or objects with a tensor-like ``to(device)`` (the models' int8
        weights). A backend may lay them out for its kernels (the CPU puts them on huge pages)."""
        device = self.device(device_index)
        return {name: tensors.pop(name).to(device) for name in list(tensors)}

    def mem_info(self, device_index: int = 0) -> MemInfo:
        """Free and total bytes of the device's memory."""
        return self._mem_info(device_index)

    def allocate_kv_cache(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device_index: int = 0,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (k_cache, v_cache) per layer in the backend's declared layout."""
        for arg, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if value <= 0:
                raise ValueError(f"allocate_kv_cache: argument '{arg}' must be positive, got {value}")
        if dtype not in self.capabilities.dtypes:
            raise ValueError(
                f"allocate_kv_cache: argument 'dtype' {dtype} is not supported by backend {self.name!r}"
            )
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        dev = self.device(device_index)
        return [
            (torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
            for _ in range(num_layers)
        ]

    def create_xtensor(
        self, num_pages: int, page_size_bytes: int | None = None, device_index: int = 0
    ) -> XTensor:
        """Reserves ``num_pages`` pages of virtual memory; none are mapped yet."""
        if not self.capabilities.virtual_memory:
            raise NotSupportedError(f"backend {self.name!r} has no virtual-memory xTensor support")
        return self._create_xtensor(num_pages, page_size_bytes, device_index)

    # ------------------------------------------------------------------ graphs

    def create_graph_runner(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        capture_sizes: Sequence[int] | None = None,
        max_batch_size: int | None = None,
        device_index: int = 0,
    ) -> GraphRunner:
        """A `GraphRunner` for `fn` on this backend; `capture()` records every bucket up front,
        otherwise `run()` captures a bucket the first time it is needed."""
        return self._create_graph_runner(fn, inputs, capture_sizes, max_batch_size, device_index)

    # ------------------------------------------------------------------ streams

    @abstractmethod
    def create_stream(self, device_index: int = 0) -> Stream: ...

    @abstractmethod
    def create_event(self, enable_timing: bool = False) -> Event: ...

    @abstractmethod
    def current_stream(self, device_index: int = 0) -> Stream: ...

    @abstractmethod
    def synchronize(self, device_index: int = 0) -> None:
        """Blocks until all queued device work is done."""

    # ------------------------------------------------------------------ comm

    def create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        """Joins a group of `world_size` processes over the backend's collective library.

        `init_method` is a torch.distributed URL such as ``tcp://127.0.0.1:29500``.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"create_communicator: argument 'rank' must be in [0, {world_size}), got {rank}")
        return self._create_communicator(rank, world_size, init_method)

    def create_kv_transfer(
        self, host: str = "127.0.0.1", port: int = 0, **options: object
    ) -> KVTransferEngine:
        """A started `KVTransferEngine` listening on `host`:`port` (0: any free port), for moving KV
        blocks between instances that share no process group (see `xllm.hal.kv_transfer`).

        The default works on every backend: TCP, with device caches staged through host memory
        (`xllm.hal.tcp_kv_transfer`; `options` are its keyword options, e.g. ``name``,
        ``advertise_host``, ``expect_timeout_s``). A backend overrides it to pin its staging
        memory or to use a device transport (NCCL, HCCL, RDMA).
        """
        from xllm.hal.tcp_kv_transfer import TcpKVTransferEngine  # sockets and threads only when asked

        options.setdefault("synchronize", lambda device: self.synchronize(device.index or 0))
        return TcpKVTransferEngine(host, port, **options).start()

    # ------------------------------------------------------------------ faults

    def is_fatal_error(self, exc: BaseException) -> bool:
        """Whether `exc`, raised while running a model step, means this device can serve no more.

        False means the failure belongs to the step: the engine fails that step's requests and
        keeps serving (out of memory, a bad argument, a kernel that rejected a shape); only a run
        of consecutive failures stops it. True means the device or its context is lost (a lost
        device, an uncorrectable memory error, a sticky kernel fault after which every later
        call fails): the engine stops at once, fails every request, and the server exits so
        that its supervisor restarts it.

        Looks at `exc` and the chain of exceptions it was raised from: a `DeviceFaultError`
        anywhere in it is fatal, and so is any link the backend's `_is_fatal_error` recognises.
        Never raises.
        """
        seen: set[int] = set()
        link: BaseException | None = exc
        while link is not None and id(link) not in seen:  # a chain can loop back on itself
            seen.add(id(link))
            if isinstance(link, DeviceFaultError) or self._is_fatal_error(link):
                return True
            if link.__cause__ is not None:  # raise ... from cause
                link = link.__cause__
            else:  # raised while handling __context__, unless "from None" hid it
                link = None if link.__suppress_context__ else link.__context__
        return False

    def _is_fatal_error(self, exc: BaseException) -> bool:
        """One link of the chain: a backend overrides this with its runtime's unrecoverable errors.

        The default knows none, so on a backend that does not override it only a
        `DeviceFaultError` is fatal, and a broken device stops the engine through the
        consecutive-failure limit instead.
        """
        return False

    # ------------------------------------------------------------------ what a backend implements

    @abstractmethod
    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def _rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def _silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _gelu_and_mul(self, x: torch.Tensor, approximate: str) -> torch.Tensor: ...

    def _embedding(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A lookup every torch device runs; a backend overrides it only to make it one of its
        own kernels (the CPU backend, so that its recorded decode step covers the whole model)."""
        return torch.nn.functional.embedding(input_ids, weight)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    def _linear_int8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
    ) -> torch.Tensor:
        return self._linear(x, dequantize_int8(qweight, scales, group_size).to(x.dtype), bias)

    @abstractmethod
    def _reshape_and_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    @abstractmethod
    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor: ...

    @abstractmethod
    def _processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor: ...

    @abstractmethod
    def _sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput: ...

    @abstractmethod
    def _mem_info(self, device_index: int) -> MemInfo: ...

    def _create_xtensor(self, num_pages: int, page_size_bytes: int | None, device_index: int) -> XTensor:
        raise NotSupportedError(f"backend {self.name!r} has no virtual-memory xTensor support")

    @abstractmethod
    def _create_graph_runner(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        capture_sizes: Sequence[int] | None,
        max_batch_size: int | None,
        device_index: int,
    ) -> GraphRunner: ...

    @abstractmethod
    def _create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator: ...

    # ------------------------------------------------------------------ shared checks

    def _check_gated(self, op: str, x: torch.Tensor) -> None:
        check_tensor(op, "x", x, ndim=(2, 3), dtypes=self.capabilities.dtypes)
        if x.shape[-1] % 2:
            raise ValueError(f"{op}: argument 'x' must have an even last dim, got {x.shape[-1]}")

    def _check_kv(
        self, op: str, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> None:
        check_tensor(op, "k", k, ndim=3, dtypes=self.capabilities.dtypes)
        check_tensor(op, "v", v, ndim=3, dtypes=(k.dtype,))
        check_tensor(op, "k_cache", k_cache, ndim=4, dtypes=(k.dtype,))
        check_tensor(op, "v_cache", v_cache, ndim=4, dtypes=(k.dtype,))
        if v.shape != k.shape:
            raise ValueError(
                f"{op}: argument 'v' has shape {tuple(v.shape)}, expected {tuple(k.shape)} like 'k'"
            )
        if v_cache.shape != k_cache.shape:
            raise ValueError(
                f"{op}: argument 'v_cache' has shape {tuple(v_cache.shape)}, expected {tuple(k_cache.shape)}"
            )
        if tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
            raise ValueError(
                f"{op}: argument 'k_cache' has (num_kv_heads, head_dim) {tuple(k_cache.shape[2:])}, "
                f"expected {tuple(k.shape[1:])} like 'k'"
            )

    def _check_sampling(self, op: str, logits: torch.Tensor, sampling: SamplingMetadata) -> None:
        check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
        if not isinstance(sampling, SamplingMetadata):
            raise ValueError(
                f"{op}: argument 'sampling' must be SamplingMetadata, got {type(sampling).__name__}"
            )
        check_dim(op, "sampling.temperature", sampling.num_rows, logits.shape[0], "row count")
        banned = sampling.banned
        if banned is not None:
            check_tensor(op, "sampling.banned", banned, ndim=2, dtypes=(torch.int64,))
            if banned.shape[1] != 2:
                raise ValueError(f"{op}: argument 'sampling.banned' must be [N, 2] (row, token id) pairs")
            if banned.numel() and not (
                bool((banned[:, 0] >= 0).all())
                and bool((banned[:, 0] < logits.shape[0]).all())
                and bool((banned[:, 1] >= 0).all())
                and bool((banned[:, 1] < logits.shape[1]).all())
            ):
                raise ValueError(
                    f"{op}: argument 'sampling.banned' holds a row or token id outside the logits "
                    f"{tuple(logits.shape)}"
                )
