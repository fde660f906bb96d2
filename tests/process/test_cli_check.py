"""``batchfit check`` as a command on the built-in demo: exit 0, JSON that ``report`` re-renders."""

from __future__ import annotations

import json


def test_cli_on_the_demo_exits_0_and_its_json_re_renders(run_cli, tmp_path) -> None:
    out = tmp_path / "demo.json"
    proc = run_cli("check", "--json", str(out))          # the built-in demo: seed layers
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "my_custom_layer" in proc.stdout and "PASS" in proc.stdout
    data = json.loads(out.read_text())
    assert data["findings"] == [] and len(data["layers"]) == 2
    again = run_cli("report", str(out))
    assert again.returncode == 0 and "my_variable_batch_layer" in again.stdout
