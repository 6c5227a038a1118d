"""Every registered backend implements the whole `Backend` contract with the base's signatures.

Parametrised over `registered_backends()`, so a new built-in or plugin backend is covered without
touching this file. A backend's module must import on every machine (its probe says why it cannot
run there), so an import failure is a failure here, not a skip.
"""

from __future__ import annotations

import inspect

import pytest

from xllm.hal import Backend, Capabilities
from xllm.hal.registry import load_backend_class, registered_backends

ABSTRACT_METHODS = sorted(Backend.__abstractmethods__)
BACKEND_NAMES = sorted(registered_backends())


def signature_shape(fn) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def contract_problems(cls: type[Backend]) -> list[str]:
    """Every way `cls` departs from the contract, so one failure lists them all."""
    problems = []
    for method in ABSTRACT_METHODS:
        impl = getattr(cls, method)
        if getattr(impl, "__isabstractmethod__", False):
            problems.append(f"{method} is not implemented")
        elif signature_shape(impl) != signature_shape(getattr(Backend, method)):
            problems.append(
                f"{method}{inspect.signature(impl)} differs from Backend.{method}{inspect.signature(getattr(Backend, method))}"
            )
    return problems


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backend_implements_contract(name):
    cls = load_backend_class(name)  # BackendUnavailableError here means its module does not import
    problems = contract_problems(cls)
    assert not problems, f"backend {name!r} ({cls.__module__}.{cls.__qualname__}):\n  " + "\n  ".join(
        problems
    )
    assert not inspect.isabstract(cls)
    assert isinstance(cls.name, str) and cls.name
    assert isinstance(cls.device_type, str) and cls.device_type
    assert isinstance(cls.CAPABILITIES, Capabilities)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_probe_answers_without_raising(name):
    cls = load_backend_class(name)
    reason = cls.probe()
    assert reason is None or (isinstance(reason, str) and reason), f"probe returned {reason!r}"
    if reason is not None:
        assert cls.device_count() == 0, "an unavailable backend must report no devices"


def test_contract_check_catches_a_wrong_signature():
    from xllm.backends.cpu.backend import CpuBackend

    class Renamed(CpuBackend):
        def _silu_and_mul(self, inp):  # parameter renamed from x
            return super()._silu_and_mul(inp)

    assert contract_problems(CpuBackend) == []
    assert [p.split("(")[0] for p in contract_problems(Renamed)] == ["_silu_and_mul"]
