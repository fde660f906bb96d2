"""The emulation's pure parts: the start-up hook, the request it reads, the child's environment.

The hook is tried on a throwaway module (no framework): it must run its action once, after the
module has executed, and find the module through the ordinary finders.
"""

from __future__ import annotations

import os
import sys

import pytest

from batchfit.emulation import SITE_DIR, bootstrap, emulation_environment, run_emulated
from batchfit.errors import InvalidInputError


def test_hook_runs_after_the_module_executed_and_only_once(tmp_path, monkeypatch) -> None:
    (tmp_path / "fake_framework.py").write_text("READY = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def action() -> None:
        seen.append(sys.modules["fake_framework"].READY)

    hook = bootstrap._AfterImport("fake_framework", action)
    sys.meta_path.insert(0, hook)
    try:
        import fake_framework  # noqa: F401
        import fake_framework as again  # noqa: F401
        sys.modules.pop("fake_framework")
        import fake_framework as fresh  # noqa: F401 - a re-import: the hook is gone
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        sys.modules.pop("fake_framework", None)
    assert seen == [True]
    assert hook not in sys.meta_path


def test_install_configures_at_once_when_the_module_is_already_imported(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(bootstrap, "_configure", lambda d, b: calls.append((d, b)))
    env = {bootstrap.ENV_VAR: bootstrap.encode("os", "CPU:0", 1 << 20)}   # "os" is imported
    assert bootstrap.install(env) is True
    assert calls == [("CPU:0", 1 << 20)]
    assert bootstrap.install({}) is False


LOTS = '{"module": "x", "device": "CPU:0", "budget_bytes": "lots"}'


@pytest.mark.parametrize("value", ["", "{", '{"module": "x"}', LOTS, "[]"])
def test_a_malformed_request_is_ignored(value) -> None:
    assert bootstrap.decode(value) is None


def test_the_child_environment_puts_the_hook_first_and_keeps_the_path(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/a", str(SITE_DIR), "/b"]))
    env = emulation_environment("96MiB")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SITE_DIR), "/a", "/b"]
    assert env["TF_CPU_BFC_MEM_LIMIT_IN_MB"] == "96"
    assert bootstrap.decode(env[bootstrap.ENV_VAR]) == {
        "module": "tensorflow", "device": "CPU:0", "budget_bytes": 96 << 20}
    assert (SITE_DIR / "sitecustomize.py").is_file()


@pytest.mark.parametrize(("command", "memory", "device", "match"), [
    ([], "64MiB", "CPU:0", "no command"),
    (["--"], "64MiB", "CPU:0", "no command"),
    (["true"], "sixty", "CPU:0", "sixty"),
    (["true"], "64MiB", "TPU:0", "CPU:N or GPU:N"),
])
def test_bad_input_is_refused_before_anything_starts(command, memory, device, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        run_emulated(command, memory, device)
