"""The registry kept in the router's memory, its HTTP API, and the client instances use to reach it.

`EmbeddedRegistry` holds `InstanceInfo` and `InstanceLoad` records under leases with etcd's
semantics: a registration grants a lease of `ttl_s`, keepalives push its deadline back, and a
lease past its deadline takes the instance's info and load with it. Expiry is checked on every
call (there is no sweeper task: nothing reads the records except through these calls). Instances
are other processes, so the router mounts `registry_api(registry)` under `/cluster/registry/` and
each instance talks to it through `HttpRegistry`, which implements the same `Registry` protocol.
If the router restarts, its registry starts empty and an instance's next keepalive is refused
(404); `HttpRegistry` then registers again, so the view is rebuilt within `ttl_s / 3`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from xllm.cluster.registry import DEFAULT_LEASE_TTL_S, InstanceInfo, InstanceLoad, Member

logger = logging.getLogger("xllm.cluster")

API_PREFIX = "/cluster/registry"


@dataclass(slots=True)
class _Lease:
    instance_id: str
    ttl_s: float
    deadline: float  # on the registry's clock


class EmbeddedRegistry:
    """In-memory `Registry` with lease expiry; safe to call from several threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._infos: dict[str, InstanceInfo] = {}
        self._loads: dict[str, InstanceLoad] = {}
        self._leases: dict[int, _Lease] = {}
        # Invariant: an instance id is in _infos iff it is in _lease_of, and its lease is in _leases.
        self._lease_of: dict[str, int] = {}
        # Keepalive tasks of registrants in this process (those that call `register` directly).
        self._keepalives: dict[str, asyncio.Task] = {}

    # The lease operations the HTTP API exposes; synchronous, each under the lock.

    def grant(self, info: InstanceInfo, ttl_s: float = DEFAULT_LEASE_TTL_S) -> int:
        """Stores `info` under a new lease and returns its id. A record already held under this
        instance id (an earlier registration, or a role change) is replaced with its lease."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        with self._lock:
            self._expire()
            load = self._loads.get(info.id)  # kept across a role change; replaced within a second
            self._drop(info.id)
            # Random 63-bit ids (like etcd's int64 ones) so that a client of a previous router
            # process cannot refresh a lease that a new process happened to number the same.
            lease_id = secrets.randbits(63)
            self._leases[lease_id] = _Lease(info.id, ttl_s, self._clock() + ttl_s)
            self._lease_of[info.id] = lease_id
            self._infos[info.id] = info
            if load is not None:
                self._loads[info.id] = load
            return lease_id

    def refresh(self, lease_id: int) -> bool:
        """Pushes the lease's deadline back by its ttl; False if it is unknown or expired."""
        with self._lock:
            self._expire()
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            lease.deadline = self._clock() + lease.ttl_s
            return True

    def put_load(self, instance_id: str, load: InstanceLoad) -> bool:
        """Replaces the instance's load; False if the instance is not registered."""
        with self._lock:
            self._expire()
            if instance_id not in self._infos:
                return False
            self._loads[instance_id] = load
            return True

    def revoke(self, instance_id: str) -> None:
        with self._lock:
            self._drop(instance_id)

    def snapshot(self) -> list[Member]:
        with self._lock:
            self._expire()
            return [Member(info, self._loads.get(iid)) for iid, info in self._infos.items()]

    def _drop(self, instance_id: str) -> None:
        lease_id = self._lease_of.pop(instance_id, None)
        if lease_id is not None:
            del self._leases[lease_id]
        self._infos.pop(instance_id, None)
        self._loads.pop(instance_id, None)

    def _expire(self) -> None:
        now = self._clock()
        for lease in [lease for lease in self._leases.values() if lease.deadline <= now]:
            logger.info("instance %s: lease expired, removed from the registry", lease.instance_id)
            self._drop(lease.instance_id)

    # The `Registry` protocol, for registrants in this process.

    async def register(self, info: InstanceInfo, ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        self._stop_keepalive(info.id)
        lease_id = self.grant(info, ttl_s)
        self._keepalives[info.id] = asyncio.create_task(self._keep_alive(info, ttl_s, lease_id))

    async def _keep_alive(self, info: InstanceInfo, ttl_s: float, lease_id: int) -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            if not self.refresh(lease_id):  # the loop was starved past the ttl
                lease_id = self.grant(info, ttl_s)

    async def publish_load(self, instance_id: str, load: InstanceLoad) -> None:
        if not self.put_load(instance_id, load):
            raise KeyError(f"instance {instance_id!r} is not registered")

    async def deregister(self, instance_id: str) -> None:
        self._stop_keepalive(instance_id)
        self.revoke(instance_id)

    async def members(self) -> list[Member]:
        return self.snapshot()

    async def close(self) -> None:
        for instance_id in list(self._keepalives):
            await self.deregister(instance_id)

    def _stop_keepalive(self, instance_id: str) -> None:
        task = self._keepalives.pop(instance_id, None)
        if task is not None:
            task.cancel()


# The HTTP API the router mounts.


class RegisterRequest(BaseModel):
    info: InstanceInfo
    ttl_s: float = Field(DEFAULT_LEASE_TTL_S, gt=0)


class RegisterResponse(BaseModel):
    lease_id: int
    ttl_s: float


def registry_api(registry: EmbeddedRegistry) -> APIRouter:
    """Routes under /cluster/registry/ over `registry`:

    POST   register            {info, ttl_s} -> {lease_id, ttl_s}
    POST   keepalive/{lease}   -> 200, or 404 when the lease is unknown or expired (register again)
    PUT    load/{instance_id}  InstanceLoad -> 200, or 404 when the instance is not registered
    DELETE instances/{id}      -> 200 (also when it was not registered)
    GET    members             -> {"members": [{"info": InstanceInfo, "load": InstanceLoad|null}]}
    """
    router = APIRouter(prefix=API_PREFIX, tags=["cluster registry"])

    @router.post("/register")
    async def register(body: RegisterRequest) -> RegisterResponse:
        return RegisterResponse(lease_id=registry.grant(body.info, body.ttl_s), ttl_s=body.ttl_s)

    @router.post("/keepalive/{lease_id}")
    async def keepalive(lease_id: int) -> dict:
        if not registry.refresh(lease_id):
            raise HTTPException(404, f"lease {lease_id} is unknown or expired; register again")
        return {"ok": True}

    @router.put("/load/{instance_id}")
    async def load(instance_id: str, body: InstanceLoad) -> dict:
        if not registry.put_load(instance_id, body):
            raise HTTPException(404, f"instance {instance_id!r} is not registered; register first")
        return {"ok": True}

    @router.delete("/instances/{instance_id}")
    async def deregister(instance_id: str) -> dict:
        registry.revoke(instance_id)
        return {"ok": True}

    @router.get("/members")
    async def members() -> dict:
        return {
            "members": [
                {"info": m.info.to_json(), "load": m.load.to_json() if m.load else None}
                for m in registry.snapshot()
            ]
        }

    return router


# The client an instance uses.


@dataclass(slots=True)
class _Registration:
    info: InstanceInfo
    ttl_s: float
    lease_id: int


class HttpRegistry:
    """`Registry` over the embedded registry of the router at `base_url` (its /cluster/registry/)."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url + API_PREFIX, timeout=timeout_s)
        self._registrations: dict[str, _Registration] = {}
        self._keepalives: dict[str, asyncio.Task] = {}

    async def register(self, info: InstanceInfo, ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        self._stop_keepalive(info.id)
        lease_id = await self._grant(info, ttl_s)
        self._registrations[info.id] = _Registration(info, ttl_s, lease_id)
        self._keepalives[info.id] = asyncio.create_task(self._keep_alive(info.id))

    async def _grant(self, info: InstanceInfo, ttl_s: float) -> int:
        response = await self._client.post("/register", json={"info": info.to_json(), "ttl_s": ttl_s})
        response.raise_for_status()
        return int(response.json()["lease_id"])

    async def _keep_alive(self, instance_id: str) -> None:
        reg = self._registrations[instance_id]
        while True:
            await asyncio.sleep(reg.ttl_s / 3)
            try:
                response = await self._client.post(f"/keepalive/{reg.lease_id}")
                if response.status_code == 404:  # expired, or the router restarted
                    logger.warning("instance %s: lease lost, registering again", instance_id)
                    reg.lease_id = await self._grant(reg.info, reg.ttl_s)
                else:
                    response.raise_for_status()
            except httpx.HTTPError as exc:
                # The router may be restarting; keep trying until it is back or we are stopped.
                logger.warning("instance %s: keepalive to %s failed: %s", instance_id, self.base_url, exc)

    async def publish_load(self, instance_id: str, load: InstanceLoad) -> None:
        response = await self._client.put(f"/load/{instance_id}", json=load.to_json())
        reg = self._registrations.get(instance_id)
        if response.status_code == 404 and reg is not None:
            reg.lease_id = await self._grant(reg.info, reg.ttl_s)
            response = await self._client.put(f"/load/{instance_id}", json=load.to_json())
        if response.status_code == 404:  # as the other registries do for an unknown instance
            raise KeyError(f"instance {instance_id!r} is not registered")
        response.raise_for_status()

    async def deregister(self, instance_id: str) -> None:
        self._stop_keepalive(instance_id)
        self._registrations.pop(instance_id, None)
        response = await self._client.delete(f"/instances/{instance_id}")
        response.raise_for_status()

    async def members(self) -> list[Member]:
        response = await self._client.get("/members")
        response.raise_for_status()
        return [
            Member(
                InstanceInfo.from_json(m["info"]), InstanceLoad.from_json(m["load"]) if m["load"] else None
            )
            for m in response.json()["members"]
        ]

    async def close(self) -> None:
        """Deregisters what this client registered (a process that closes its registry is
        leaving) and closes the connection pool."""
        for instance_id in list(self._registrations):
            with contextlib.suppress(httpx.HTTPError):  # the router may already be gone
                await self.deregister(instance_id)
        await self._client.aclose()

    def _stop_keepalive(self, instance_id: str) -> None:
        task = self._keepalives.pop(instance_id, None)
        if task is not None:
            task.cancel()
