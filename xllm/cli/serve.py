"""`xllm serve`: the OpenAI-compatible HTTP server, engine loop in the same process."""

from __future__ import annotations

import argparse
import logging

from xllm.cli.engine_args import add_engine_arguments, engine_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the model's)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="answer 429 while more than N requests wait in the engine (default: no limit)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight requests before aborting them",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    c = p.add_argument_group("cluster", "membership in an xllm cluster (see xllm.cluster.instance)")
    c.add_argument(
        "--role",
        default="mixed",
        choices=["mixed", "prefill", "decode"],
        help="the instance's role in a cluster: which part of a request the router sends it "
        "(prefill: the prompt and first token, its KV held for a decode instance; decode: the rest, "
        "its KV fetched from the prefill instance; mixed: whole requests). Every instance can serve "
        "every part, so a role can be switched live (POST /cluster/role)",
    )
    c.add_argument(
        "--registry",
        default=None,
        metavar="URL",
        help="register in this cluster registry (etcd://HOST:PORT, or a router's http://HOST:PORT) "
        "and publish load every second (default: register nowhere)",
    )
    c.add_argument(
        "--advertise-url",
        default=None,
        metavar="URL",
        help="URL routers reach this server at (default: http://HOST:PORT)",
    )
    c.add_argument("--instance-id", default=None, help="name in the registry (default: <hostname>-<port>)")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xllm.cli.main import CLIError

    if args.max_queue is not None and args.max_queue < 0:
        raise CLIError("--max-queue must be >= 0")
    if args.shutdown_timeout < 0:
        raise CLIError("--shutdown-timeout must be >= 0")
    if args.max_consecutive_step_failures < 1:
        raise CLIError("--max-consecutive-step-failures must be >= 1")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from xllm.service.app import ServerConfig
    from xllm.service.server import serve

    kwargs = engine_kwargs(args)
    model = kwargs.pop("model")
    config = ServerConfig(
        model=None if model is None else str(model),
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_queue=args.max_queue,
        shutdown_timeout_s=args.shutdown_timeout,
        engine_kwargs=kwargs,
    )
    hooks = []
    if args.registry:
        import os

        from xllm.cluster.instance import RegistryHook, default_advertise_url, default_instance_id
        from xllm.cluster.registry import Role

        hooks.append(
            RegistryHook(
                args.registry,
                role=Role(args.role),
                advertise_url=args.advertise_url or default_advertise_url(args.host, args.port),
                instance_id=args.instance_id or default_instance_id(args.port),
                backend=str(kwargs.get("backend") or os.environ.get("XLLM_BACKEND") or "auto"),
                block_size=kwargs["block_size"],
            )
        )
    return serve(config, host=args.host, port=args.port, log_level=args.log_level, hooks=hooks)
