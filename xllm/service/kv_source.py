"""The decode side's way to a prefill instance's held KV: its `/v1/kv/send` endpoint.

A decode request names where its prompt KV is held (``kv_transfer_params``: the prefill
instance's URL and the transfer id it answered with). The engine allocates the blocks, starts
expecting the transfer on its own `KVTransferEngine`, and calls `request_send` from a worker
thread: that asks the prefill instance, over HTTP, to push the blocks to this instance's transfer
address. A refusal (the hold expired, a bad range) or an unreachable instance raises, and the
engine prefills the request locally instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

KV_SEND_PATH = "/v1/kv/send"


class KVSendRefused(RuntimeError):
    """The prefill instance did not send (its answer's message says why)."""


@dataclass(slots=True)
class HttpKVSource:
    remote_url: str  # the prefill instance, e.g. http://10.0.0.5:8001
    transfer_id: str
    headers: dict[str, str] = field(default_factory=dict)  # the client's credentials, passed on
    timeout_s: float = 60.0

    def request_send(self, destination: str, first_block: int, num_tokens: int) -> None:
        body = {
            "transfer_id": self.transfer_id,
            "destination": destination,
            "first_block": first_block,
            "num_tokens": num_tokens,
        }
        try:
            r = httpx.post(
                self.remote_url.rstrip("/") + KV_SEND_PATH,
                json=body,
                headers=self.headers,
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise KVSendRefused(f"cannot reach {self.remote_url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise KVSendRefused(f"{self.remote_url} answered {r.status_code}: {message}")

    def describe(self) -> str:
        return self.remote_url
