"""Helpers for the router tests: an in-memory `Registry` and a router app under uvicorn in a thread.

A plain module (not conftest.py) so that test modules import it unambiguously.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from xllm.cluster.registry import InstanceInfo, InstanceLoad, Member
from xllm.cluster.router import create_router_app


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """Any ASGI app under uvicorn in a daemon thread, on a free loopback port."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class RouterServer(AppServer):
    """A router app (`create_router_app(registry, policy, **kwargs)`) under uvicorn."""

    def __init__(self, registry, policy: str, **kwargs) -> None:
        super().__init__(create_router_app(registry, policy, **kwargs))
        self.state = self.app.state.router


class MemoryRegistry:
    """The `Registry` protocol in a dict: no leases, the test removes members itself."""

    def __init__(self) -> None:
        self.infos: dict[str, InstanceInfo] = {}
        self.loads: dict[str, InstanceLoad] = {}

    async def register(self, info: InstanceInfo, ttl_s: float = 5.0) -> None:
        self.infos[info.id] = info

    async def publish_load(self, instance_id: str, load: InstanceLoad) -> None:
        self.loads[instance_id] = load

    async def deregister(self, instance_id: str) -> None:
        self.infos.pop(instance_id, None)
        self.loads.pop(instance_id, None)

    async def members(self) -> list[Member]:
        return [Member(info, self.loads.get(i)) for i, info in list(self.infos.items())]

    async def close(self) -> None:
        pass
