"""The backend is found the way any out-of-tree backend is: through the entry-point group."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib.metadata import entry_points

from xllm.hal import Backend, list_backends
from xllm.hal.registry import ENTRY_POINT_GROUP, load_backend_class


def test_registered_through_the_entry_point_group():
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert found.get("jax") == "xllm_jax.backend:JaxBackend"


def test_registry_loads_and_lists_it():
    from xllm_jax.backend import JaxBackend

    assert load_backend_class("jax") is JaxBackend
    info = {i.name: i for i in list_backends()}["jax"]
    assert info.available, info.reason
    assert info.device_count == 1


def test_implements_the_contract_with_the_base_signatures():
    cls = load_backend_class("jax")
    assert not inspect.isabstract(cls)
    for method in Backend.__abstractmethods__:
        mine = [(p.name, p.kind) for p in inspect.signature(getattr(cls, method)).parameters.values()]
        base = [(p.name, p.kind) for p in inspect.signature(getattr(Backend, method)).parameters.values()]
        assert mine == base, method


def test_probe_does_not_import_jax():
    # `xllm backends` imports every backend module to probe it; jax must load only when used.
    code = (
        "import sys; from xllm.hal.registry import load_backend_class; "
        "cls = load_backend_class('jax'); assert cls.probe() is None; "
        "assert 'jax' not in sys.modules, 'probing imported jax'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rejects_options(jax_backend):
    assert type(jax_backend).probe(interpret=True) is not None
