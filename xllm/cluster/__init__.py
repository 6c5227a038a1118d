"""The cluster layer: many `xllm serve` instances behind one OpenAI endpoint.

It sits beside the service (cluster -> service -> engine -> hal) and never imports a backend:
instances register in a registry (`registry.py`: embedded in the router, or etcd), publish their
load, and a router places each request by a policy (cache-aware, least-loaded, round-robin).
"""
