"""`xllm router`: one OpenAI endpoint in front of the instances registered in a registry."""

from __future__ import annotations

import argparse
import logging

POLICIES = ("cache_aware", "least_loaded", "round_robin")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="run the cluster router in front of registered instances")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--registry",
        default="embedded",
        help="where instances register: 'embedded' (in this process) or a registry URL such as "
        "etcd://127.0.0.1:2379 (default: embedded)",
    )
    p.add_argument("--policy", default="cache_aware", choices=POLICIES, help="placement policy")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for cache-aware placement (default: the first instance's model, if it is a "
        "directory on this host)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight requests before stopping",
    )
    p.add_argument(
        "--pd",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split requests into a prefill part and a decode part when both roles are up (default: on)",
    )
    p.add_argument(
        "--slo",
        default=None,
        metavar="ttft_ms=MS,tpot_ms=MS",
        help="let the router move instances between prefill and decode on its own, from the TTFT and "
        "TPOT it observes against these targets (p90 over a 20 s window, 30 s between switches)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def open_registry_from_arg(spec: str):  # -> Registry
    """'embedded': an `EmbeddedRegistry` in this process (its HTTP API mounted by the router);
    anything else is a URL for `xllm.cluster.registry.open_registry` (etcd://, http(s)://)."""
    from xllm.cli.main import CLIError

    if spec == "embedded":
        from xllm.cluster.embedded_registry import EmbeddedRegistry

        return EmbeddedRegistry()
    from xllm.cluster.registry import open_registry

    try:
        return open_registry(spec)
    except ValueError as exc:
        raise CLIError(f"--registry: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from xllm.cli.main import CLIError

    if args.shutdown_timeout < 0:
        raise CLIError("--shutdown-timeout must be >= 0")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn

    from xllm.cluster.policies import PolicyName
    from xllm.cluster.router import RouterState, create_router_app
    from xllm.service.server import DrainingServer

    registry = open_registry_from_arg(args.registry)
    from xllm.cluster.slo import SloBalancer, SloTargets

    try:
        slo = SloBalancer(SloTargets.parse(args.slo)) if args.slo else None
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    state = RouterState(registry, PolicyName(args.policy), tokenizer_path=args.tokenizer, pd=args.pd, slo=slo)
    app = create_router_app(registry, state=state, close_registry=True)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    # DrainingServer only needs `in_flight` and `drain(timeout_s)`, which RouterState has: the
    # first SIGTERM refuses new requests with 503 and waits for in-flight ones, as `xllm serve`.
    DrainingServer(config, state, args.shutdown_timeout).run()  # type: ignore[arg-type]
    return 0
