"""`xllm cluster`: a whole cluster on this host (`up`), and what a router sees of it (`status`).

`xllm cluster up --mixed K` starts, as child processes, a local etcd (``--registry etcd``), one
`xllm router` and K `xllm serve --instance-id mixed-<i>` instances registered with it, each
child's output in a log file of a run directory; it waits until the router lists the K instances
up, prints ``router: URL`` and the instance table, then waits. Ctrl-C or SIGTERM stops every child
(SIGTERM, then SIGKILL after a timeout) and exits 0; a child that dies during start-up stops the
rest and exits 1, naming it with the tail of its log. Every engine flag is forwarded to every
instance.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xllm.cli.engine_args import add_engine_arguments
from xllm.cli.router import POLICIES

DEFAULT_ROUTER = "http://127.0.0.1:8000"
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 400


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cluster", help="run a cluster on this host, or show a router's instances")
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    sub.required = True

    up = sub.add_parser("up", help="start a router and K instances on this host; Ctrl-C stops them all")
    up.add_argument("--mixed", type=int, default=None, metavar="K", help="number of mixed instances")
    up.add_argument("--prefill", type=int, default=0, metavar="N", help="prefill instances (with --decode)")
    up.add_argument("--decode", type=int, default=0, metavar="M", help="decode instances (with --prefill)")
    up.add_argument(
        "--slo",
        default=None,
        metavar="ttft_ms=MS,tpot_ms=MS",
        help="the router's slo role balancer (see xllm router)",
    )
    up.add_argument(
        "--registry",
        default="embedded",
        choices=["embedded", "etcd"],
        help="embedded (in the router) or etcd (a local etcd started for this cluster)",
    )
    up.add_argument("--port", type=int, default=8000, help="the router's port (default: 8000)")
    up.add_argument("--policy", default="cache_aware", choices=POLICIES, help="the router's placement policy")
    up.add_argument(
        "--run-dir", default=None, help="directory for the children's logs (default: a new temp dir)"
    )
    up.add_argument(
        "--startup-timeout",
        type=float,
        default=STARTUP_TIMEOUT_S,
        help="seconds to wait for every instance up",
    )
    up.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_arguments(up)
    up.set_defaults(func=run_up)

    st = sub.add_parser("status", help="print the instances a router sees")
    st.add_argument("--router", default=DEFAULT_ROUTER, help=f"the router's URL (default: {DEFAULT_ROUTER})")
    st.add_argument("--json", action="store_true", help="print the raw JSON of GET /cluster/instances")
    st.set_defaults(func=run_status)


# --- engine flags ---------------------------------------------------------------------------


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of `args` that differ from their defaults, as `xllm serve` arguments."""
    from xllm.engine.config import EngineConfig

    probe = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(probe)
    argv: list[str] = []
    for action in probe._actions:
        if action.dest not in EngineConfig.model_fields or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else next(s for s in action.option_strings if s.startswith("--no-")))
        elif action.nargs == "+":
            argv += [flag, *map(str, value)]
        elif isinstance(action, argparse._AppendAction):
            for key, item in value:
                argv += [flag, f"{key}={item if isinstance(item, str) else json.dumps(item)}"]
        else:
            argv += [flag, str(value)]
    return argv


# --- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Child:
    """One child process whose output goes to `<run dir>/<name>.log`."""

    def __init__(self, name: str, argv: list[str], run_dir: Path) -> None:
        self.name = name
        self.log_path = run_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Its own process group: a Ctrl-C in the terminal reaches `cluster up` alone, which then
        # stops the children in order.
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip()
        return " | ".join(text[-LOG_TAIL_CHARS:].splitlines()[-5:])

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _stop_all(children: list[Child], etcd, timeout_s: float = STOP_TIMEOUT_S) -> None:
    # Instances first (they leave the registry), then the router, then etcd.
    instances = [c for c in children if c.name != "router"]
    routers = [c for c in children if c.name == "router"]
    for group in (instances, routers):
        for child in group:
            child.terminate()
        deadline = time.monotonic() + timeout_s
        for child in group:
            child.wait_or_kill(deadline)
    if etcd is not None:
        etcd.stop()


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop


def _fetch_instances(router_url: str, timeout_s: float = 2.0) -> list[dict]:
    import httpx

    response = httpx.get(f"{router_url.rstrip('/')}/cluster/instances", timeout=timeout_s)
    response.raise_for_status()
    return response.json()


def _transfers(count: int, num_bytes: int) -> str:
    """KV hand-offs of one direction: how many and how much (``12 / 3.4 MB``)."""
    return "-" if not count else f"{count} / {num_bytes / 1e6:.1f} MB"


def format_table(instances: list[dict]) -> str:
    header = (
        "ID",
        "ROLE",
        "STATUS",
        "URL",
        "RUNNING",
        "WAITING",
        "KV USAGE",
        "KV SENT",
        "KV RECEIVED",
        "PID",
    )
    rows = [header] + [
        (
            str(i.get("id")),
            str(i.get("role")),
            str(i.get("status")),
            str(i.get("url")),
            str(i.get("num_requests_running", 0)),
            str(i.get("num_requests_waiting", 0)),
            f"{100 * float(i.get('kv_cache_usage') or 0.0):.1f}%",
            _transfers(i.get("kv_transfers_sent", 0), i.get("kv_transfer_bytes_sent", 0)),
            _transfers(i.get("kv_transfers_received", 0), i.get("kv_transfer_bytes_received", 0)),
            "-" if i.get("pid") is None else str(i["pid"]),
        )
        for i in sorted(instances, key=lambda i: str(i.get("id")))
    ]
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def run_up(args: argparse.Namespace) -> int:
    from xllm.cli.main import CLIError

    mixed, prefill, decode = args.mixed or 0, args.prefill or 0, args.decode or 0
    if min(mixed, prefill, decode) < 0:
        raise CLIError("--mixed, --prefill and --decode take counts >= 0")
    if bool(prefill) != bool(decode):
        raise CLIError("--prefill N and --decode M go together (a request needs both parts)")
    if mixed + prefill + decode < 1:
        raise CLIError("start at least one instance: --mixed K, or --prefill N --decode M")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="xllm-cluster-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {run_dir}", flush=True)
    router_url = f"http://127.0.0.1:{args.port}"
    python = [sys.executable, "-m", "xllm"]
    children: list[Child] = []
    etcd = None
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.registry == "etcd":
            from xllm.cluster.etcd_server import EtcdServer, EtcdUnavailableError

            try:
                (run_dir / "etcd").mkdir(exist_ok=True)
                etcd = EtcdServer(data_dir=run_dir / "etcd").start()
            except EtcdUnavailableError as exc:
                etcd = None
                raise CLIError(f"etcd did not start: {str(exc).splitlines()[0]}", 1) from exc
            registry = router_registry = etcd.url
            print(f"etcd: {etcd.url}", flush=True)
        else:
            router_registry, registry = "embedded", router_url
        children.append(
            Child(
                "router",
                [*python, "router", "--port", str(args.port), "--registry", router_registry,
                 "--policy", args.policy, "--log-level", args.log_level,
                 *(["--slo", args.slo] if args.slo else [])],
                run_dir,
            )
        )  # fmt: skip
        forwarded = engine_argv(args)
        for role, count in (("mixed", mixed), ("prefill", prefill), ("decode", decode)):
            for i in range(count):
                children.append(
                    Child(
                        f"{role}-{i}",
                        [*python, "serve", "--port", str(_free_port()), "--registry", registry,
                         "--instance-id", f"{role}-{i}", "--role", role, "--log-level", args.log_level,
                         *forwarded],
                        run_dir,
                    )
                )  # fmt: skip
        instances = _wait_up(children, router_url, mixed + prefill + decode, args.startup_timeout)
        print(f"router: {router_url}", flush=True)
        print(format_table(instances), flush=True)
        while True:
            for child in children:
                if child.proc.poll() is not None:
                    print(
                        f"xllm cluster: warning: {child.name} exited with {child.proc.returncode}; "
                        f"log {child.log_path}",
                        file=sys.stderr,
                        flush=True,
                    )
                    children.remove(child)
                    break
            time.sleep(0.5)
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping the cluster", file=sys.stderr, flush=True)
        _stop_all(children, etcd)
        return 0
    except BaseException:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_all(children, etcd)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_up(children: list[Child], router_url: str, k: int, timeout_s: float) -> list[dict]:
    from xllm.cli.main import CLIError

    deadline = time.monotonic() + timeout_s
    while True:
        for child in children:
            if (rc := child.proc.poll()) is not None:
                raise CLIError(f"{child.name} exited with {rc} during start-up: {child.tail()}", 1)
        try:
            instances = _fetch_instances(router_url)
        except Exception:
            instances = []
        if sum(1 for i in instances if i.get("status") == "up") >= k:
            return instances
        if time.monotonic() > deadline:
            raise CLIError(f"the router did not list {k} instances up within {timeout_s:g} s", 1)
        time.sleep(0.25)


def run_status(args: argparse.Namespace) -> int:
    from xllm.cli.main import CLIError

    try:
        instances = _fetch_instances(args.router, timeout_s=5.0)
    except Exception as exc:
        raise CLIError(f"cannot reach the router at {args.router} ({type(exc).__name__}: {exc})", 1) from exc
    if args.json:
        print(json.dumps(instances, indent=2))
    elif not instances:
        print("no instances registered")
    else:
        print(format_table(instances))
    return 0
