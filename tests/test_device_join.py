"""``hmf-device join --tier auto``: the device measures the ONNX graphs of ``hmf export onnx``
(here: untrained hapt, exported through the real CLI), picks the deepest tier whose p95 fits the
budget and announces it in its hello on a real mosquitto."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from click.testing import CliRunner
from mqtt_broker import Broker, Proc, retained_presence

from cloud.cli import hmf
from common import protocol as p
from device.cli import hmf_device


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Untrained hapt, fp32 exit and segment graphs, exported as a user would."""
    out = tmp_path_factory.mktemp("onnx")
    result = CliRunner().invoke(hmf, ["export", "onnx", "--model", "hapt", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["tiers"] == [1, 2, 3]
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3, 151), np.float32), y=np.zeros(4, np.int64))
    return path


def join_args(data, work, *extra, broker="mqtt://127.0.0.1:1"):
    """Arguments of ``hmf-device join`` (the default broker is never reached: the errors
    tested come before the device connects)."""
    return ["join", "--broker", broker, "--device-id", "d1", "--data", str(data),
            "--work-dir", str(work), "--threads", "1", *extra]


def test_huge_budget_chooses_tier_3_and_the_hello_says_so(graphs, data, tmp_path):
    broker = Broker(tmp_path).start()
    try:
        device = Proc("dev", ["hmf-device", *join_args(data, tmp_path / "w", "--tier", "auto",
                                                       "--budget-ms", "1e9", "--model-dir",
                                                       str(graphs), broker=broker.url)],
                      tmp_path / "dev.log")
        device.wait_for("connected; hello sent", timeout=60)
        out = device.text()
        for k in (1, 2, 3):
            assert f"d1: exit {k}: p95 " in out and "fits the 1e+09 ms budget" in out
        assert "tier auto: chose tier 3" in out and "tier 3)" in out  # the 'joining' line
        hello = p.parse_control(retained_presence(broker.url, "d1"))
        assert hello["type"] == "hello" and hello["tier"] == 3 and hello["samples"] == 4
        device.proc.send_signal(signal.SIGTERM)
        assert device.wait(20) == 0, device.text()
    finally:
        broker.stop()


def test_tiny_budget_is_a_clear_error_before_connecting(graphs, data, tmp_path):
    r = CliRunner().invoke(hmf_device, join_args(data, tmp_path / "w", "--tier", "auto",
                                                 "--budget-ms", "1e-6", "--model-dir",
                                                 str(graphs)))
    assert r.exit_code == 1, r.output
    assert "exit 1: p95 " in r.output and "over the 1e-06 ms budget" in r.output
    assert "no tier fits the 1e-06 ms budget on this device: even exit 1 takes" in r.output
    assert "joining" not in r.output


def test_no_graphs_is_a_clear_error(data, tmp_path):
    """The default model dir is WORK_DIR/model; an empty one (or a missing one) is refused."""
    r = CliRunner().invoke(hmf_device, join_args(data, tmp_path / "w", "--tier", "auto",
                                                 "--budget-ms", "5"))
    assert r.exit_code == 1
    assert f"no manifest.json in {tmp_path / 'w' / 'model'}" in r.output
    assert "hmf export onnx" in r.output


def test_tier_and_budget_arguments_are_checked(data, tmp_path):
    runner = CliRunner()
    no_budget = runner.invoke(hmf_device, join_args(data, tmp_path, "--tier", "auto"))
    assert no_budget.exit_code == 2 and "--tier auto needs --budget-ms" in no_budget.output
    stray = runner.invoke(hmf_device, join_args(data, tmp_path, "--tier", "2",
                                                "--budget-ms", "5"))
    assert stray.exit_code == 2 and "--budget-ms needs --tier auto" in stray.output
    bad = runner.invoke(hmf_device, join_args(data, tmp_path, "--tier", "4"))
    assert bad.exit_code == 2 and "1, 2, 3 or auto" in bad.output
    negative = runner.invoke(hmf_device, join_args(data, tmp_path, "--tier", "auto",
                                                   "--budget-ms", "-1"))
    assert negative.exit_code == 1 and "must be positive" in negative.output
