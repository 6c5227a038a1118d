"""docs/PORTING.md says true things: what it names exists, with the shape it gives.

The guide is read the way a porter reads it: its method table against `xllm.hal.Backend`'s
signatures, its backend snippet executed and compared with `AscendBackend`, its file table and
dotted references against the modules, its registration block against the registry, its probe
table against `probe_reason`, and its shell commands parsed by the real `xllm` parser. A renamed
method, a stale signature or a command that no longer parses fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest
import torch

from xllm.backends.ascend import probe as ascend_probe
from xllm.backends.ascend.backend import AscendBackend
from xllm.backends.cuda.backend import CudaBackend
from xllm.backends.cuda.interpret import CudaInterpretBackend
from xllm.hal import AttentionMetadata, Backend, Capabilities, GraphRunner, registry

ROOT = Path(__file__).resolve().parents[3]
GUIDE = (ROOT / "docs" / "PORTING.md").read_text()
ASCEND_MODULES = ("backend", "probe", "op_mapping", "translation", "torch_ops", "runtime", "acl")
# What a backticked `Name.attr` in the guide may refer to.
NAMESPACE = {
    **{stem: importlib.import_module(f"xllm.backends.ascend.{stem}") for stem in ASCEND_MODULES},
    **{
        cls.__name__: cls
        for cls in (Backend, AscendBackend, CudaBackend, CudaInterpretBackend, GraphRunner, AttentionMetadata)
    },
}
BACKTICKED = re.compile(r"`([^`\n]+)`")
SIGNATURE = re.compile(r"^(\w+)(?:\(([^)]*)\))?$")


def section(number: int) -> str:
    """The text of ``## <number>.`` up to the next ``## `` heading."""
    match = re.search(rf"^## {number}\..*?(?=^## |\Z)", GUIDE, flags=re.M | re.S)
    assert match, f"PORTING.md has no section {number}"
    return match.group(0)


def code_blocks(language: str, text: str | None = None) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", GUIDE if text is None else text, flags=re.M | re.S)


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header` (separator dropped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, f"empty table {header!r}"
    return rows


def parameters(fn) -> list[str]:
    """Parameter names as a signature spells them (``**options``), without self / cls."""
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [
        prefix.get(p.kind, "") + p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name not in ("self", "cls")
    ]


# ------------------------------------------------------------------ section 2: the contract


def test_method_table_is_the_backend_contract():
    documented = set()
    for method_cell, *_ in table_rows(section(2), "| method |"):
        optional = "(optional)" in method_cell
        for item in BACKTICKED.findall(method_cell):
            match = SIGNATURE.match(item)
            assert match, f"cannot read {item!r} as a method"
            name, params = match.groups()
            assert hasattr(Backend, name), f"the guide names Backend.{name}, which does not exist"
            documented.add(name)
            if params is not None:
                said = [p.strip() for p in params.split(",") if p.strip() not in ("", "self", "cls")]
                assert said == parameters(getattr(Backend, name)), f"{name}: guide says ({params})"
            abstract = name in Backend.__abstractmethods__
            assert abstract != optional, f"{name}: the guide says optional={optional}, the base class differs"
    missing = Backend.__abstractmethods__ - documented
    assert not missing, f"abstract methods the guide does not list: {sorted(missing)}"


def test_backend_snippet_is_the_real_backend():
    """The class in section 2, executed as written, declares what the registered class declares."""
    (snippet,) = code_blocks("python", section(2))
    namespace = {"Backend": Backend, "Capabilities": Capabilities, "torch": torch}
    exec(compile(snippet, "PORTING.md", "exec"), namespace)
    (documented,) = [
        v for v in namespace.values() if isinstance(v, type) and issubclass(v, Backend) and v is not Backend
    ]
    real = registry.load_backend_class(documented.name)
    assert real.__name__ == documented.__name__
    assert documented.device_type == real.device_type
    calls = [
        n
        for n in ast.walk(ast.parse(snippet))
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Capabilities"
    ]
    (call,) = calls
    for keyword in (kw.arg for kw in call.keywords):
        assert getattr(documented.CAPABILITIES, keyword) == getattr(real.CAPABILITIES, keyword), keyword


def test_second_mode_paragraph_names_what_the_subclass_overrides():
    text = section(2).split("### A second mode is a subclass", 1)[1]
    overrides = text.split("overrides what needs a GPU:", 1)[1].split("(", 1)[0]
    named = BACKTICKED.findall(overrides)
    assert named, "the paragraph lists no overridden method"
    for name in named:
        assert name in vars(CudaInterpretBackend), f"CudaInterpretBackend does not override {name}"
    assert "interpret_kernels" in vars(CudaInterpretBackend)


# ------------------------------------------------------------------ names the guide uses anywhere


def test_backticked_references_resolve():
    """`module.attr` / `Class.attr`, `Sub(Base)`, repository paths and `get_backend(name, option=...)`."""
    for item in set(BACKTICKED.findall(GUIDE)):
        if re.fullmatch(r"[\w.]+\.(py|md|toml|json|so)", item):
            continue  # a file name, not an attribute
        if match := re.fullmatch(r"(\w+)\.(\w+)(?:\(.*\))?", item):
            owner, attr = match.groups()
            if owner in NAMESPACE:
                obj = NAMESPACE[owner]
                fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
                assert hasattr(obj, attr) or attr in fields, f"`{item}`: {owner} has no {attr}"
        elif match := re.fullmatch(r"(\w+)\((\w+)\)", item):
            sub, base = match.groups()
            if sub in NAMESPACE:
                assert issubclass(NAMESPACE[sub], NAMESPACE[base]), item
        elif re.fullmatch(r"(xllm|tests|docs)/[\w/.]+", item):
            assert (ROOT / item).exists(), f"`{item}` does not exist"
    for name, options in re.findall(r'get_backend\("(\w+)"((?:, \w+=\w+)+)\)', GUIDE):
        cls = registry.load_backend_class(name)
        for option in re.findall(r"(\w+)=", options):
            assert option in parameters(cls.__init__), f"{cls.__name__} takes no option {option!r}"


def test_file_table_names_real_modules_and_symbols():
    for file_cell, job in table_rows(section(1), "| file |"):
        stem = file_cell.strip("`").removesuffix(".py")
        module = NAMESPACE[stem]
        for item in BACKTICKED.findall(job):
            name = item.removesuffix("()")
            if re.fullmatch(r"[A-Za-z]\w+", name):  # not `_`, `__init__` or dotted torch names
                assert hasattr(module, name), f"{file_cell} has no {name}"


# ------------------------------------------------------------------ sections 4-6


def test_registration_matches_the_registry():
    text = section(4)
    for name, target in re.findall(r'"(\w+)": "([\w.]+:\w+)"', text):
        assert registry.BUILTIN_BACKENDS[name] == target
        assert registry.load_backend_class(name).__name__ == target.split(":")[1]
    (pyproject,) = code_blocks("toml", text)
    assert re.findall(r'^\[project\.entry-points\."([\w.]+)"\]$', pyproject, flags=re.M) == [
        registry.ENTRY_POINT_GROUP
    ]
    assert f"`{registry.ENV_VAR}=" in text
    order = re.search(r"falls back through\s+((?:`\w+`,?\s*)+)", text)
    assert order and tuple(re.findall(r"`(\w+)`", order.group(1))) == registry.DEFAULT_PREFERENCE


def test_probe_table_is_probe_reason_in_order():
    """Row i's reason is what `probe_reason` says when its i-th check fails and the earlier pass."""

    def fail_import():
        raise ImportError("libhccl.so: cannot open shared object file")

    passing = dict(
        installed=lambda: True, load_acl=lambda: object(), import_npu=lambda: None, device_count=lambda: 1
    )
    failing = dict(
        installed=lambda: False, load_acl=lambda: None, import_npu=fail_import, device_count=lambda: 0
    )
    rows = table_rows(section(5), "| check |")
    assert len(rows) == len(failing)
    for i, (_check, reason) in enumerate(rows):
        checks = {**passing, **{k: failing[k] for k in list(failing)[i : i + 1]}}
        got = ascend_probe.probe_reason(**checks)
        documented = BACKTICKED.findall(reason)[0]  # the reason; an example may follow
        pattern = "".join(
            ".+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]+>)", documented)
        )
        assert re.fullmatch(pattern, got), (documented, got)


def test_shell_commands_are_real(pytestconfig):
    from xllm.cli.main import build_parser

    markers = {m.split(":")[0] for m in pytestconfig.getini("markers")}
    # pyproject's [project.optional-dependencies] lines, `name = ["req", ...]` (no tomllib on 3.10)
    extras = dict(re.findall(r"^(\w+) = \[([^\]]*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M))
    commands = [line for block in code_blocks("bash") for line in block.splitlines() if line.strip()]
    assert commands
    for line in commands:
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
            words.pop(0)
        if words[0] == "xllm":
            try:
                build_parser().parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"`{line}` does not parse")
        elif words[0] == "pytest" or words[:3] == ["python", "-m", "pytest"]:
            if "-m" in words[1:] and words[0] == "pytest":
                assert set(words[words.index("-m") + 1].split()) <= markers | {"not", "and", "or"}, line
            paths = [w for w in words if w.startswith(("tests/", "plugins/"))]
            assert all((ROOT / w).exists() for w in paths), line
        elif words[:3] == ["pip", "install", "-e"] and not words[3].startswith("."):
            assert (ROOT / words[3] / "pyproject.toml").exists(), line  # a package in the repository
        elif words[:3] == ["pip", "install", "-e"]:
            extra = re.fullmatch(r"\.\[(\w+)\]", words[3]).group(1)
            pinned = re.search(r"# ([\w-]+==[\w.]+)", line)
            assert extra in extras and (pinned is None or pinned.group(1) in extras[extra]), line
        else:
            pytest.fail(f"no check for the command `{line}`")
