"""`Registry` over an etcd v3 server, with the original system's key layout.

An instance's `InstanceInfo` is JSON under ``XLLM:{MIX|PREFILL|DECODE}:<id>`` and its
`InstanceLoad` under ``XLLM:LOADMETRICS:<id>``, both attached to one lease per instance that a
background task refreshes every ``ttl_s / 3``; when the process dies etcd deletes both keys at
the lease's expiry, and `deregister` revokes the lease so they go at once. The client is
`aetcd` (asyncio over etcd's gRPC API). etcd leases are whole seconds with a server minimum
(about 2 s with default election settings), so ``ttl_s`` is rounded up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass

import aetcd

from xllm.cluster.registry import DEFAULT_LEASE_TTL_S, InstanceInfo, InstanceLoad, Member, Role

logger = logging.getLogger("xllm.cluster")

KEY_PREFIX = "XLLM:"
LOAD_KEY = "LOADMETRICS"
ROLE_KEYS = {Role.MIXED: "MIX", Role.PREFILL: "PREFILL", Role.DECODE: "DECODE"}
ROLE_OF_KEY = {v: k for k, v in ROLE_KEYS.items()}


def info_key(instance_id: str, role: Role) -> bytes:
    return f"{KEY_PREFIX}{ROLE_KEYS[role]}:{instance_id}".encode()


def load_key(instance_id: str) -> bytes:
    return f"{KEY_PREFIX}{LOAD_KEY}:{instance_id}".encode()


@dataclass(slots=True)
class _Registration:
    info: InstanceInfo
    ttl_s: int
    lease: aetcd.Lease


class EtcdRegistry:
    """`Registry` on the etcd server at host:port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2379, timeout_s: float = 5.0) -> None:
        self.host, self.port = host, port
        self._client = aetcd.Client(host=host, port=port, timeout=timeout_s)
        self._registrations: dict[str, _Registration] = {}
        self._keepalives: dict[str, asyncio.Task] = {}

    async def register(self, info: InstanceInfo, ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        ttl = max(1, math.ceil(ttl_s))
        old = self._registrations.get(info.id)
        if old is not None and old.ttl_s == ttl:
            # A role change: same lease and keepalive, so the load stays and the id never vanishes.
            old.info = info
            await self._put_info(old)
            return
        self._stop_keepalive(info.id)
        if old is not None:
            del self._registrations[info.id]
            await old.lease.revoke()
        reg = _Registration(info, ttl, await self._client.lease(ttl))
        await self._put_info(reg)
        self._registrations[info.id] = reg
        self._keepalives[info.id] = asyncio.create_task(self._keep_alive(info.id))

    async def _put_info(self, reg: _Registration) -> None:
        await self._client.put(
            info_key(reg.info.id, reg.info.role), json.dumps(reg.info.to_json()).encode(), lease=reg.lease
        )
        # Only one role key per id (an earlier role of ours, or one another process left). Deleted
        # after the put so that a reader never finds the id missing.
        for role in Role:
            if role is not reg.info.role:
                await self._client.delete(info_key(reg.info.id, role))

    async def _keep_alive(self, instance_id: str) -> None:
        reg = self._registrations[instance_id]
        while True:
            await asyncio.sleep(reg.ttl_s / 3)
            try:
                reply = await reg.lease.refresh()
                if reply is None or reply.TTL <= 0:  # expired while we could not reach etcd
                    logger.warning("instance %s: etcd lease expired, registering again", instance_id)
                    reg.lease = await self._client.lease(reg.ttl_s)
                    await self._put_info(reg)
            except aetcd.ClientError as exc:
                logger.warning(
                    "instance %s: keepalive to etcd %s:%d failed: %s", instance_id, self.host, self.port, exc
                )

    async def publish_load(self, instance_id: str, load: InstanceLoad) -> None:
        reg = self._registrations.get(instance_id)
        if reg is None:
            raise KeyError(f"instance {instance_id!r} is not registered through this registry")
        await self._client.put(load_key(instance_id), json.dumps(load.to_json()).encode(), lease=reg.lease)

    async def deregister(self, instance_id: str) -> None:
        self._stop_keepalive(instance_id)
        reg = self._registrations.pop(instance_id, None)
        if reg is not None:
            await reg.lease.revoke()
        else:  # registered by another process: delete its keys (its lease then holds none)
            for role in Role:
                await self._client.delete(info_key(instance_id, role))
            await self._client.delete(load_key(instance_id))

    async def members(self) -> list[Member]:
        infos: dict[str, InstanceInfo] = {}
        loads: dict[str, InstanceLoad] = {}
        for kv in await self._client.get_prefix(KEY_PREFIX.encode()):
            _, kind, instance_id = kv.key.decode().split(":", 2)
            if kind == LOAD_KEY:
                loads[instance_id] = InstanceLoad.from_json(json.loads(kv.value))
            elif kind in ROLE_OF_KEY:
                infos[instance_id] = InstanceInfo.from_json(json.loads(kv.value))
            # Other kinds (the original system's DEFAULT) are not ours to read.
        return [Member(info, loads.get(iid)) for iid, info in infos.items()]

    async def close(self) -> None:
        """Deregisters what this client registered (a process that closes its registry is
        leaving) and closes the channel."""
        for instance_id in list(self._registrations):
            with contextlib.suppress(aetcd.ClientError):  # etcd may already be gone
                await self.deregister(instance_id)
        await self._client.close()

    def _stop_keepalive(self, instance_id: str) -> None:
        task = self._keepalives.pop(instance_id, None)
        if task is not None:
            task.cancel()
