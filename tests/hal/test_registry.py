"""Backend registry: lookup by name, environment and entry points; clear errors; `xllm backends`."""

from __future__ import annotations

import json

import pytest

from xllm.backends.cpu.backend import CpuBackend
from xllm.hal import (
    BackendUnavailableError,
    UnknownBackendError,
    get_backend,
    list_backends,
    register_backend,
    registry,
    unregister_backend,
)


class NoDeviceBackend(CpuBackend):
    """Registered, importable, but never available: what an absent accelerator looks like."""

    name = "nodevice"

    @classmethod
    def probe(cls, **options: object) -> str | None:
        return "no NoDevice accelerator found (test double)"


@pytest.fixture
def temp_backends():
    names: list[str] = []

    def add(name: str, target) -> None:
        register_backend(name, target)
        names.append(name)

    yield add
    for name in names:
        unregister_backend(name)


def test_get_backend_cpu_is_cached():
    backend = get_backend("cpu")
    assert isinstance(backend, CpuBackend)
    assert backend.name == "cpu" and backend.device_type == "cpu"
    assert get_backend("cpu") is backend  # one instance per process for every layer


def test_unknown_name_lists_known_backends():
    with pytest.raises(UnknownBackendError) as info:
        get_backend("no-such-accelerator")
    message = str(info.value)
    assert "no-such-accelerator" in message
    for name in ("cpu", "cuda", "ascend"):
        assert name in message and name in info.value.known


def test_registered_but_unavailable_backend_gives_its_reason(temp_backends):
    temp_backends("nodevice", NoDeviceBackend)
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("nodevice")
    assert info.value.reason == "no NoDevice accelerator found (test double)"
    assert "no NoDevice accelerator" in str(info.value)


def test_unimportable_backend_is_unavailable_not_a_crash(temp_backends):
    temp_backends("broken", "xllm_no_such_module.backend:Broken")
    with pytest.raises(BackendUnavailableError, match="cannot import"):
        get_backend("broken")
    infos = {i.name: i for i in registry.list_backends()}
    assert not infos["broken"].available and "cannot import" in infos["broken"].reason


def test_env_var_is_honoured(monkeypatch, temp_backends):
    assert registry.ENV_VAR == "XLLM_BACKEND"
    monkeypatch.setenv("XLLM_BACKEND", "cpu")
    assert isinstance(get_backend(), CpuBackend)
    temp_backends("nodevice", NoDeviceBackend)
    monkeypatch.setenv("XLLM_BACKEND", "nodevice")  # the env var wins over auto-selection
    with pytest.raises(BackendUnavailableError, match="NoDevice"):
        get_backend()
    monkeypatch.setenv("XLLM_BACKEND", "not-registered")
    with pytest.raises(UnknownBackendError):
        get_backend()


def test_auto_selection_falls_back_to_cpu(monkeypatch):
    monkeypatch.delenv("XLLM_BACKEND", raising=False)
    monkeypatch.setattr(registry, "DEFAULT_PREFERENCE", ("nonexistent-but-unavailable", "cpu"))
    monkeypatch.setattr(
        registry,
        "_entry_point_backends",
        lambda: {"nonexistent-but-unavailable": "xllm_no_such_module:X"},
    )
    assert isinstance(get_backend(), CpuBackend)


class OptionsBackend(CpuBackend):
    """Records the options it was built with (what `backend_options` / `--backend-option` give)."""

    name = "options-recorder"

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = options


def test_auto_selection_passes_options_to_the_chosen_backend(monkeypatch, temp_backends):
    # Auto-selection used to call get_backend(candidate) and drop the options on the floor, so a
    # backend chosen by $XLLM_BACKEND-less default ran without what the user asked for.
    monkeypatch.delenv("XLLM_BACKEND", raising=False)
    temp_backends("nodevice", NoDeviceBackend)
    temp_backends("options-recorder", OptionsBackend)
    monkeypatch.setattr(registry, "DEFAULT_PREFERENCE", ("nodevice", "options-recorder"))
    backend = get_backend(None, answer=42)
    assert isinstance(backend, OptionsBackend) and backend.options == {"answer": 42}
    assert get_backend(None, answer=42) is backend  # cached per name and options as by name
    assert get_backend().options == {}  # no options: another instance


PLUGIN_MODULE = """
from xllm.hal.backend import Backend


class DemoBackend(Backend):
    name = "demo"
    device_type = "cpu"

    @classmethod
    def probe(cls, **options):
        return "no demo accelerator attached"
"""


def test_entry_point_group_registers_out_of_tree_backends(tmp_path, monkeypatch):
    """A separately installed distribution declaring an `xllm.backends` entry point is found
    without touching xllm: a real package and .dist-info on sys.path, read by importlib.metadata."""
    assert registry.ENTRY_POINT_GROUP == "xllm.backends"
    (tmp_path / "xllm_demo_plugin").mkdir()
    (tmp_path / "xllm_demo_plugin" / "__init__.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "xllm_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xllm-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xllm.backends]\ndemo = xllm_demo_plugin:DemoBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert registry.registered_backends()["demo"] == "xllm_demo_plugin:DemoBackend"
    assert registry.load_backend_class("demo").__name__ == "DemoBackend"
    with pytest.raises(BackendUnavailableError, match="no demo accelerator attached"):
        get_backend("demo")
    listed = {i.name: i for i in list_backends()}
    assert listed["demo"].available is False and listed["demo"].reason == "no demo accelerator attached"


def test_cli_backends_json_lists_cpu_available(capsys, monkeypatch):
    from xllm.cli import main as cli_main

    assert cli_main.main(["backends", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    cpu = entries["cpu"]
    assert cpu["available"] is True and cpu["reason"] is None and cpu["device_count"] == 1
    assert cpu["capabilities"]["collective_backend"] == "gloo"
    assert set(cpu["capabilities"]["dtypes"]) == {"float32", "bfloat16", "float16"}
    for name in ("cuda", "ascend"):
        assert name in entries
        assert entries[name]["available"] or entries[name]["reason"]  # unavailable ones say why
