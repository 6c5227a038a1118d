"""The cluster's membership contract: what an instance publishes and what a router reads.

Membership is data in a registry, not state in a router (so a router can restart, or several can
run, and rebuild their view). An instance writes its `InstanceInfo` under a lease that it keeps
alive, and refreshes its `InstanceLoad` every second; when it dies, its lease expires and its keys
disappear by themselves. Two implementations share this interface: `EmbeddedRegistry` (in the
router process, for one machine) and `EtcdRegistry` (etcd v3, the store the original system uses;
keys ``XLLM:{MIX|PREFILL|DECODE}:<id>`` and ``XLLM:LOADMETRICS:<id>``).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Protocol

DEFAULT_LEASE_TTL_S = 5.0
LOAD_INTERVAL_S = 1.0
# An instance publishes at most this many cached-prefix block digests (hex), newest first.
MAX_PUBLISHED_BLOCKS = 4096


class Role(str, enum.Enum):
    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


class Status(str, enum.Enum):
    UP = "up"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass(slots=True)
class InstanceInfo:
    """What an instance is; written once at registration (and again when its role changes)."""

    id: str
    role: Role
    url: str  # base URL of its OpenAI API, e.g. http://127.0.0.1:8001
    model: str  # the served model name
    backend: str
    capacity: int  # max_num_seqs
    block_size: int  # KV block size in tokens, to compute prefix digests the way it does
    pid: int | None = None  # set when `xllm cluster up` started it

    def to_json(self) -> dict:
        return {**asdict(self), "role": self.role.value}

    @classmethod
    def from_json(cls, data: dict) -> InstanceInfo:
        return cls(**{**data, "role": Role(data["role"])})


@dataclass(slots=True)
class InstanceLoad:
    """How busy an instance is; refreshed every `LOAD_INTERVAL_S`."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    draining: bool = False
    # Hex SHA-256 digests of the full KV blocks in its prefix cache (see
    # xllm.engine.kv_cache_manager.chain_hash), capped at MAX_PUBLISHED_BLOCKS.
    cached_blocks: list[str] = field(default_factory=list)
    updated_at: float = 0.0  # time.time() of the instance when published
    # Prefill/decode hand-off so far (counters since the instance started).
    kv_transfers_sent: int = 0
    kv_transfers_received: int = 0
    kv_transfer_bytes_sent: int = 0
    kv_transfer_bytes_received: int = 0
    kv_transfer_failures: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> InstanceLoad:
        # Fields this version does not know (a newer instance) are ignored, missing ones default.
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)


@dataclass(slots=True)
class Member:
    """One instance as a router sees it."""

    info: InstanceInfo
    load: InstanceLoad | None


class Registry(Protocol):
    """Implemented by `EmbeddedRegistry` and `EtcdRegistry`; every method is a coroutine."""

    async def register(self, info: InstanceInfo, ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        """Writes `info` under a new lease of `ttl_s` and keeps the lease alive in the background
        until `deregister` (or until this process dies, when the keys expire by themselves)."""

    async def publish_load(self, instance_id: str, load: InstanceLoad) -> None:
        """Replaces the instance's load record (under the same lease)."""

    async def deregister(self, instance_id: str) -> None:
        """Revokes the lease: the instance's keys disappear at once."""

    async def members(self) -> list[Member]:
        """Every live instance with its latest load."""

    async def close(self) -> None: ...


def open_registry(url: str) -> Registry:
    """The registry at `url`: ``etcd://host:port`` (an etcd v3 server) or ``http(s)://...`` (the
    embedded registry of the router serving at that URL)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "etcd" and parts.hostname:
        from xllm.cluster.etcd_registry import EtcdRegistry

        return EtcdRegistry(parts.hostname, parts.port or 2379)
    if parts.scheme in ("http", "https") and parts.hostname:
        from xllm.cluster.embedded_registry import HttpRegistry

        return HttpRegistry(url)
    raise ValueError(f"registry URL {url!r}: expected etcd://HOST:PORT or the router's http(s)://HOST:PORT")
