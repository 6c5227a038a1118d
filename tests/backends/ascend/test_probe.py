"""The Ascend probe: the exact reason on this machine, its decision logic with injected results,
and that the backend is listed (unavailable, with the reason) without torch_npu installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xllm.backends.ascend import probe
from xllm.backends.ascend.backend import AscendBackend
from xllm.hal import BackendUnavailableError, get_backend, list_backends

THIS_MACHINE_REASON = probe.probe_reason()


def test_module_import_does_not_import_torch_npu():
    """Importing the backend (what `xllm backends` does) never loads torch_npu or CANN."""
    code = "import sys, xllm.backends.ascend.backend as b; print(b.AscendBackend.name, 'torch_npu' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ascend", "False"]


@pytest.mark.skipif(probe.torch_npu_installed(), reason="torch_npu is installed on this machine")
def test_reason_here_is_not_installed():
    assert AscendBackend.probe() == "torch_npu is not installed"
    assert AscendBackend.device_count() == 0
    with pytest.raises(BackendUnavailableError, match="torch_npu is not installed"):
        get_backend("ascend")


def ok_import():
    return object()


def failing_import():
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")


@pytest.mark.parametrize(
    ("installed", "acl", "importer", "count", "expected"),
    [
        (False, object(), ok_import, 1, "torch_npu is not installed"),
        (
            True,
            None,
            ok_import,
            1,
            "CANN not found (libascendcl.so not loadable; set ASCEND_HOME_PATH / source set_env.sh)",
        ),
        (
            True,
            object(),
            failing_import,
            1,
            "torch_npu failed to import: ImportError: libhccl.so: cannot open shared object file: No such file or directory",
        ),
        (True, object(), ok_import, 0, "no NPU device visible"),
        (True, object(), ok_import, 2, None),
    ],
)
def test_probe_decision(installed, acl, importer, count, expected):
    reason = probe.probe_reason(
        installed=lambda: installed, load_acl=lambda: acl, import_npu=importer, device_count=lambda: count
    )
    assert reason == expected


def test_probe_checks_in_order_and_stops_at_first_failure():
    seen: list[str] = []

    def step(name, value):
        def f():
            seen.append(name)
            return value

        return f

    probe.probe_reason(
        installed=step("installed", True),
        load_acl=step("acl", None),
        import_npu=step("import", None),
        device_count=step("count", 1),
    )
    assert seen == ["installed", "acl"]  # never imports torch_npu without CANN


def test_probe_never_raises():
    def boom():
        raise RuntimeError("driver exploded")

    assert probe.probe_reason(installed=boom) == "probe failed: RuntimeError: driver exploded"
    assert (
        probe.probe_reason(
            installed=lambda: True, load_acl=lambda: object(), import_npu=ok_import, device_count=boom
        )
        == "probe failed: RuntimeError: driver exploded"
    )


def test_acl_candidates_follow_cann_environment(monkeypatch):
    monkeypatch.setenv("ASCEND_HOME_PATH", "/opt/cann")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    paths = probe.acl_library_candidates()
    assert paths[0] == "libascendcl.so"
    assert "/opt/cann/lib64/libascendcl.so" in paths
    assert paths[-1] == "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so"


def test_list_backends_reports_ascend_with_reason():
    info = next(i for i in list_backends() if i.name == "ascend")
    assert info.available is (THIS_MACHINE_REASON is None)
    assert info.reason == THIS_MACHINE_REASON
    assert info.capabilities is AscendBackend.CAPABILITIES
    if THIS_MACHINE_REASON is not None:
        assert info.device_count == 0


def test_cli_backends_json_shows_ascend():
    proc = subprocess.run(
        [sys.executable, "-m", "xllm", "backends", "--json"], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = next(e for e in json.loads(proc.stdout) if e["name"] == "ascend")
    assert entry["reason"] == THIS_MACHINE_REASON
    assert entry["available"] is (THIS_MACHINE_REASON is None)
    assert entry["capabilities"]["collective_backend"] == "hccl"
    assert entry["capabilities"]["graph_capture"] is True and entry["capabilities"]["virtual_memory"] is True
