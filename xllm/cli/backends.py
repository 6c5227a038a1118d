"""`xllm backends`: which accelerators this machine can use, and why not the others."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "backends", help="list registered backends, their availability and capabilities"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xllm.hal import list_backends

    infos = list_backends()
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    rows = [("NAME", "AVAILABLE", "DEVICES", "CAPABILITIES", "REASON")]
    for info in infos:
        caps = info.capabilities.as_dict() if info.capabilities else {}
        cap_text = (
            f"dtypes={','.join(caps['dtypes'])} graphs={'yes' if caps['graph_capture'] else 'eager'} "
            f"vmm={'yes' if caps['virtual_memory'] else 'no'} comm={caps['collective_backend']}"
            if caps
            else "-"
        )
        rows.append(
            (
                info.name,
                "yes" if info.available else "no",
                str(info.device_count),
                cap_text,
                info.reason or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return 0
