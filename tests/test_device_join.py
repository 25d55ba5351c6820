"""``hmf-device join --tier auto``: the device measures the ONNX graphs of ``hmf export onnx``
(here: untrained hapt, exported through the real CLI), picks the deepest tier whose p95 fits the
budget and announces it in its hello on a real mosquitto."""

from __future__ import annotations

import getpass
import json
import re
import signal
import time

import numpy as np
import pytest
from click.testing import CliRunner
from mqtt_broker import Broker, Proc, free_port, retained_presence

from cloud.broker_config import password_hash
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
    for budget in ("-1", "0", "nan", "inf"):
        refused = runner.invoke(hmf_device, join_args(data, tmp_path, "--tier", "auto",
                                                      "--budget-ms", budget))
        assert refused.exit_code == 2, refused.output
        assert "must be a positive number of milliseconds" in refused.output
    for timeout in ("-1", "nan"):
        refused = runner.invoke(hmf_device, join_args(data, tmp_path, "--tier", "1",
                                                      "--connect-timeout", timeout))
        assert refused.exit_code == 2 and "--connect-timeout" in refused.output


def test_a_closed_port_says_what_it_waits_for_and_gives_up(data, tmp_path):
    """Nothing listens on the port: the device says so at every attempt and fails after
    --connect-timeout with a message, not silence."""
    port = free_port()
    start = time.monotonic()
    r = CliRunner().invoke(hmf_device, join_args(data, tmp_path / "w", "--tier", "1",
                                                 "--no-serve-latest", "--connect-timeout", "2",
                                                 broker=f"mqtt://127.0.0.1:{port}"))
    took = time.monotonic() - start
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert took < 15, took
    assert f"d1: joining 127.0.0.1:{port} (4 samples, tier 1); giving up after 2 s" in r.output
    assert re.search(rf"d1: cannot reach the broker at 127\.0\.0\.1:{port} \(connection "
                     rf"refused\); retrying in \d+ s", r.output)
    assert (f"Error: could not reach the broker at 127.0.0.1:{port} within 2 s (last attempt: "
            "connection refused): check --broker") in r.output
    assert "--connect-timeout 0 waits forever" in r.output


def test_a_wrong_password_fails_clearly(data, tmp_path):
    """A real mosquitto with a password file: the device is refused ("Not authorized"),
    says so and which options to check, and gives up after --connect-timeout."""
    port = free_port()
    (tmp_path / "passwd").write_text(f"d1:{password_hash('right')}\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npersistence false\n"
                    f"password_file {tmp_path / 'passwd'}\nuser {getpass.getuser()}\n")
    (tmp_path / "wrong.txt").write_text("wrong\n")
    broker = Broker(tmp_path, conf, port).start()
    try:
        r = CliRunner().invoke(hmf_device, join_args(
            data, tmp_path / "w", "--tier", "1", "--no-serve-latest", "--connect-timeout", "2",
            "--password-file", str(tmp_path / "wrong.txt"), broker=broker.url))
    finally:
        broker.stop()
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert re.search(rf"d1: the broker at 127\.0\.0\.1:{port} refused the connection \(Not "
                     r"authorized; check --username/--password-file\); retrying in \d+ s",
                     r.output)
    assert "lost the broker" not in r.output  # it was never connected
    assert (f"Error: the broker at 127.0.0.1:{port} refused this device for 2 s (Not "
            "authorized): check --username and --password-file") in r.output
