"""The instance side of the cluster: an `xllm serve` that registers itself and reports its load.

`InstanceAgent` writes the instance's `InstanceInfo` into a `Registry` under a lease (the registry
keeps the lease alive), then every `LOAD_INTERVAL_S` publishes an `InstanceLoad` read from the
engine through the `EngineClient` protocol alone: running and waiting requests, KV usage, whether
the server drains, and the hex digests of its cached prefix blocks (most recently used first,
at most `MAX_PUBLISHED_BLOCKS`) for cache-aware routing. `stop()` revokes the lease.

A registry that cannot be reached never holds up serving: the agent runs in a task of its own,
logs one warning per outage, and retries with exponential backoff; a failed publish is followed
by a fresh `register` (the registry, e.g. a restarted router's embedded one, may have lost the
lease). Every registry call has a timeout, so a hung registry cannot hang the drain either.

`RegistryHook` wires an agent into `xllm serve` (a `xllm.service.app.ServerHook`): it opens the
registry once the model is ready, and leaves the cluster at the start of the SIGTERM drain, so
that no router places new work on an instance that is about to stop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import BaseModel

from xllm.cluster.registry import (
    DEFAULT_LEASE_TTL_S,
    LOAD_INTERVAL_S,
    MAX_PUBLISHED_BLOCKS,
    InstanceInfo,
    InstanceLoad,
    Registry,
    Role,
)
from xllm.service.errors import OpenAIError

if TYPE_CHECKING:
    from xllm.service.app import ServerState
    from xllm.service.engine_client import EngineClient

logger = logging.getLogger("xllm.cluster")

MAX_BACKOFF_S = 30.0
REGISTRY_CALL_TIMEOUT_S = 5.0
DEREGISTER_TIMEOUT_S = 2.0  # bounds what an unreachable registry adds to a drain


class InstanceAgent:
    """Registers one instance and keeps its load fresh in a registry; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        info: InstanceInfo,
        engine: EngineClient,
        is_draining: Callable[[], bool],
        *,
        interval_s: float = LOAD_INTERVAL_S,
        ttl_s: float = DEFAULT_LEASE_TTL_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        call_timeout_s: float = REGISTRY_CALL_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.info = info
        self.engine = engine
        self.is_draining = is_draining
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.max_backoff_s = max_backoff_s
        self.call_timeout_s = call_timeout_s
        self.registered = False
        self.loads_published = 0
        self._task: asyncio.Task | None = None
        self._stopped = False

    def load(self) -> InstanceLoad:
        """The instance's load now, from the engine's counters and its prefix cache."""
        stats = self.engine.stats()
        digests = self.engine.cached_block_digests(MAX_PUBLISHED_BLOCKS)
        kv = stats.kv_transfer
        return InstanceLoad(
            kv_transfers_sent=kv.sends if kv else 0,
            kv_transfers_received=kv.receives if kv else 0,
            kv_transfer_bytes_sent=kv.bytes_sent if kv else 0,
            kv_transfer_bytes_received=kv.bytes_received if kv else 0,
            kv_transfer_failures=sum(kv.failures.values()) if kv else 0,
            num_requests_running=stats.num_running,
            num_requests_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            draining=bool(self.is_draining()),
            cached_blocks=[d.hex() for d in digests[:MAX_PUBLISHED_BLOCKS]],
            updated_at=time.time(),
        )

    async def set_role(self, role: Role) -> None:
        """Re-registers under `role` (a live role switch): out under the old role's key, in
        under the new one's, so a router never sees the instance in both roles."""
        if role is self.info.role:
            return
        old = self.info.role
        if self.registered:
            await asyncio.wait_for(self.registry.deregister(self.info.id), self.call_timeout_s)
        self.info = replace(self.info, role=role)
        self.registered = False
        await asyncio.wait_for(self.registry.register(self.info, self.ttl_s), self.call_timeout_s)
        self.registered = True
        await asyncio.wait_for(self.registry.publish_load(self.info.id, self.load()), self.call_timeout_s)
        logger.info("instance %s switched from %s to %s", self.info.id, old.value, role.value)

    async def start(self) -> None:
        """Starts registering and publishing in the background; returns at once."""
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xllm-instance-agent")

    async def stop(self) -> None:
        """Stops publishing and revokes the lease (bounded by a timeout); safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.registered:
            self.registered = False
            try:
                await asyncio.wait_for(
                    self.registry.deregister(self.info.id), min(self.call_timeout_s, DEREGISTER_TIMEOUT_S)
                )
                logger.info("instance %s left the registry", self.info.id)
            except Exception as exc:  # its lease expires by itself within its TTL
                logger.warning(
                    "could not deregister instance %s (%s); its lease will expire", self.info.id, exc
                )

    async def _run(self) -> None:
        backoff = self.interval_s
        outage = False
        while True:
            try:
                if not self.registered:
                    await asyncio.wait_for(self.registry.register(self.info, self.ttl_s), self.call_timeout_s)
                    self.registered = True
                    logger.info(
                        "instance %s registered as %s at %s",
                        self.info.id,
                        self.info.role.value,
                        self.info.url,
                    )
                await asyncio.wait_for(
                    self.registry.publish_load(self.info.id, self.load()), self.call_timeout_s
                )
                self.loads_published += 1
                if outage:
                    logger.info("registry reachable again; instance %s is published", self.info.id)
                outage, backoff = False, self.interval_s
                await asyncio.sleep(self.interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The next attempt registers again: the lease may be gone with the registry.
                self.registered = False
                if not outage:
                    logger.warning(
                        "registry unreachable for instance %s (%s: %s); serving on and retrying with backoff",
                        self.info.id,
                        type(exc).__name__,
                        exc,
                    )
                    outage = True
                else:
                    logger.debug("registry still unreachable", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)


def default_advertise_url(host: str, port: int) -> str:
    """``http://<host>:<port>``; a wildcard bind address is replaced by this machine's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def default_instance_id(port: int) -> str:
    return f"{socket.gethostname()}-{port}"


async def _open(url: str) -> Registry:
    # Imported here: `open_registry` picks the implementation (etcd://, http://) and may import
    # optional clients, which a server without --registry should never need.
    from xllm.cluster.registry import open_registry  # type: ignore[attr-defined]

    registry: Any = open_registry(url)
    if inspect.isawaitable(registry):
        registry = await registry
    return registry


class RoleChange(BaseModel):
    role: Role


class RegistryHook:
    """Membership of one `xllm serve` in a cluster: a `ServerHook` running an `InstanceAgent`."""

    def __init__(
        self,
        registry_url: str,
        *,
        role: Role,
        advertise_url: str,
        instance_id: str,
        backend: str,
        block_size: int,
        open_registry: Callable[[str], Any] | None = None,
        interval_s: float = LOAD_INTERVAL_S,
    ) -> None:
        self.registry_url = registry_url
        self.role = role
        self.advertise_url = advertise_url
        self.instance_id = instance_id
        self.backend = backend
        self.block_size = block_size
        self._open_registry = open_registry
        self.interval_s = interval_s
        self.registry: Registry | None = None
        self.agent: InstanceAgent | None = None

    async def on_ready(self, state: ServerState) -> None:
        from xllm.service.app import Phase

        engine = state.engine
        assert engine is not None
        try:
            if self._open_registry is not None:
                registry = self._open_registry(self.registry_url)
                if inspect.isawaitable(registry):
                    registry = await registry
            else:
                registry = await _open(self.registry_url)
        except Exception as exc:
            logger.error("cannot open registry %s (%s); this instance serves alone", self.registry_url, exc)
            return
        self.registry = registry
        info = InstanceInfo(
            id=self.instance_id,
            role=self.role,
            url=self.advertise_url,
            model=state.model_name,
            backend=self.backend,
            capacity=engine.max_num_seqs,
            block_size=self.block_size,
            pid=os.getpid(),
        )
        self.agent = InstanceAgent(
            registry, info, engine, lambda: state.phase is Phase.DRAINING, interval_s=self.interval_s
        )
        await self.agent.start()

    def api_router(self) -> APIRouter:
        """``GET/POST /cluster/role``: the instance's role, and a live switch (the router calls it)."""
        api = APIRouter(prefix="/cluster")

        @api.get("/role")
        async def get_role() -> dict[str, str]:
            role = self.agent.info.role if self.agent is not None else self.role
            return {"id": self.instance_id, "role": role.value}

        @api.post("/role")
        async def set_role(body: RoleChange) -> dict[str, str]:
            self.role = body.role
            if self.agent is not None:
                try:
                    await self.agent.set_role(body.role)
                except Exception as exc:
                    raise OpenAIError(
                        503, f"the registry did not take the new role: {exc}", code="registry"
                    ) from exc
            return {"id": self.instance_id, "role": body.role.value}

        return api

    async def on_drain(self, state: ServerState) -> None:
        if self.agent is not None:
            await self.agent.stop()

    async def on_shutdown(self, state: ServerState) -> None:
        if self.agent is not None:
            await self.agent.stop()
        if self.registry is not None:
            registry, self.registry = self.registry, None
            try:
                await asyncio.wait_for(registry.close(), DEREGISTER_TIMEOUT_S)
            except Exception:
                logger.debug("closing the registry failed", exc_info=True)
