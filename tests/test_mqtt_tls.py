"""TLS and mutual TLS against a real mosquitto: certificates made with the openssl command line,
the broker configured by ``hmf-cloud broker-config --tls-*`` (run as the console script), and
clients connecting as the product does (``common.mqtt_link``) or as a bare paho client.

What must hold: the right CA and password get in and can publish/subscribe; plain TCP, an
untrusted CA or (with ``--require-client-cert``) a missing client certificate do not; and a
real round runs over ``mqtts://`` with ``hmf-cloud start`` and ``hmf-device join``."""

from __future__ import annotations

import getpass
import queue
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import BIN, Broker, Proc, free_port
from paho.mqtt.enums import CallbackAPIVersion

from cloud.broker_config import CLOUD_USER
from cloud.config import RunConfig
from cloud.fleet import write_partition
from cloud.runlog import read_metrics
from common import protocol as p
from common.mqtt_link import Link, broker_settings

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN=hmf test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(d: Path, name: str, ca: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\nauthorityKeyIdentifier=keyid,issuer\n"
                                   "subjectKeyIdentifier=hash\nbasicConstraints=CA:FALSE\n")
    _openssl(d, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
             "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca (signs server and client), server (127.0.0.1 and localhost), client, and an unrelated
    rogue CA with a client certificate of its own."""
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "localhost",
               "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _make_leaf(d, "client", "ca", "dev-00", "extendedKeyUsage=clientAuth")
    _make_leaf(d, "rogue-client", "rogue-ca", "dev-00", "extendedKeyUsage=clientAuth")
    return d


def tls_broker(tmp: Path, pki: Path, devices: list[str], mutual: bool) -> Broker:
    """``hmf-cloud broker-config`` as a user would run it, in the certificates' directory with
    relative file names; mosquitto then started from elsewhere (this process's cwd)."""
    port = free_port()
    out = tmp / "broker"
    args = [str(BIN / "hmf-cloud"), "broker-config", "--out", str(out), "--port", str(port),
            "--bind", "127.0.0.1", "--run-as", getpass.getuser(),
            "--tls-ca", "ca.crt", "--tls-cert", "server.crt", "--tls-key", "server.key"]
    for d in devices:
        args += ["--devices", d]
    if mutual:
        args.append("--require-client-cert")
    done = subprocess.run(args, cwd=pki, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    conf = (out / "mosquitto.conf").read_text()
    assert f"listener {port} 127.0.0.1" in conf
    assert f"require_certificate {'true' if mutual else 'false'}" in conf
    b = Broker(tmp, out / "mosquitto.conf", port).start()
    b.secrets = out / "secrets"
    return b


@pytest.fixture
def broker(tmp_path, pki):
    b = tls_broker(tmp_path, pki, ["dev-00", "dev-01"], mutual=False)
    yield b
    b.stop()


@pytest.fixture
def mutual_broker(tmp_path, pki):
    b = tls_broker(tmp_path, pki, ["dev-00"], mutual=True)
    yield b
    b.stop()


def secret(broker: Broker, user: str) -> str:
    return (broker.secrets / f"{user}.txt").read_text().strip()


def connect(port: int, user: str, password: str, *, tls: bool = True, ca: Path | None = None,
            cert: Path | None = None, key: Path | None = None, host: str = "127.0.0.1",
            timeout: float = 5.0) -> str:
    """One bare paho connection attempt: "ok" on a successful CONNACK, otherwise what went
    wrong (an exception, a refusal, a disconnect or no answer)."""
    result: queue.Queue[str] = queue.Queue()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=user)
    c.username_pw_set(user, password)
    if tls:
        c.tls_set(ca_certs=str(ca) if ca else None, certfile=str(cert) if cert else None,
                  keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED)
    c.on_connect = lambda cl, ud, fl, rc, pr: result.put("refused: " + str(rc)
                                                        if rc.is_failure else "ok")
    c.on_disconnect = lambda cl, ud, fl, rc, pr: result.put("disconnected: " + str(rc))
    try:
        c.connect(host, port, keepalive=10)
    except OSError as e:  # ssl.SSLError included: the handshake failed
        return f"error: {e!r}"
    c.loop_start()
    try:
        return result.get(timeout=timeout)
    except queue.Empty:
        return "no answer"
    finally:
        c.disconnect()
        c.loop_stop()


def link(broker: Broker, user: str, subs: list[str], ca: Path | None,
         cert: Path | None = None, key: Path | None = None, host: str = "127.0.0.1") -> Link:
    settings = broker_settings(f"mqtts://{host}:{broker.port}", username=user,
                               password_file=str(broker.secrets / f"{user}.txt"),
                               tls_ca=str(ca) if ca else None,
                               tls_cert=str(cert) if cert else None,
                               tls_key=str(key) if key else None)
    assert settings.tls and settings.port == broker.port
    return Link(user, settings, subs)


def messages(lk: Link, want: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            ev = lk.events.get(timeout=0.1)
        except queue.Empty:
            continue
        if ev[0] == "message":
            got.append((ev[1], ev[2]))
    return got


def test_tls_link_publishes_and_subscribes_with_the_right_ca(broker, pki):
    cloud = link(broker, CLOUD_USER, [p.device_topic("+", "update")], pki / "ca.crt")
    dev = link(broker, "dev-00", [p.device_topic("dev-00", "task")], pki / "ca.crt",
               host="localhost")  # the certificate's DNS name as well as its IP
    for lk in (cloud, dev):
        lk.start()
    try:
        for lk in (cloud, dev):
            assert lk.connected.wait(10), "no TLS connection:\n" + broker.log()[-2000:]
        time.sleep(0.2)  # SUBACKs
        blob = bytes(range(256)) * 4000  # ~1 MB: 2 chunks through the TLS listener
        ref, frames = p.chunk_frames(blob, "run", 1)
        for f in frames:
            dev.publish(p.device_topic("dev-00", "update"), f)
        dev.publish(p.device_topic("dev-01", "update"), b"forged")  # ACL still applies
        cloud.publish(p.device_topic("dev-00", "task"), b"task for dev-00")
        got = messages(cloud, len(frames) + 1, timeout=2)  # the forged one never comes
        assert {t for t, _ in got} == {"hmf/v1/devices/dev-00/update"}
        r = p.Reassembly(ref)
        for _, payload in got:
            r.add(p.parse_chunk(payload))
        assert r.blob() == blob
        assert messages(dev, 1) == [("hmf/v1/devices/dev-00/task", b"task for dev-00")]
    finally:
        for lk in (cloud, dev):
            lk.stop()


def test_plain_tcp_and_untrusted_cas_are_refused(broker, pki):
    password = secret(broker, "dev-00")
    assert connect(broker.port, "dev-00", password, ca=pki / "ca.crt") == "ok"  # control
    assert connect(broker.port, "dev-00", "wrong", ca=pki / "ca.crt").startswith("refused")
    assert connect(broker.port, "dev-00", password, tls=False) != "ok"  # plain MQTT
    for ca in (pki / "rogue-ca.crt", None):  # another CA; the system's CAs only
        outcome = connect(broker.port, "dev-00", password, ca=ca)
        assert outcome.startswith("error") and "CERTIFICATE_VERIFY_FAILED" in outcome, outcome
    # the product's client without --tls-ca on mqtts:// does not get in either
    lk = link(broker, "dev-00", [], ca=None)
    lk.start()
    try:
        assert not lk.connected.wait(2)
    finally:
        lk.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mutual_broker, pki):
    b, ca = mutual_broker, pki / "ca.crt"
    password = secret(b, "dev-00")
    assert connect(b.port, "dev-00", password, ca=ca) != "ok"  # no client certificate
    rogue = connect(b.port, "dev-00", password, ca=ca, cert=pki / "rogue-client.crt",
                    key=pki / "rogue-client.key")
    assert rogue != "ok"
    with_cert = dict(ca=ca, cert=pki / "client.crt", key=pki / "client.key")
    assert connect(b.port, "dev-00", password, **with_cert) == "ok"
    # the certificate does not replace the password
    assert connect(b.port, "dev-00", "wrong", **with_cert).startswith("refused")
    assert connect(b.port, "dev-00", password, tls=False) != "ok"


def test_a_round_over_mutual_tls(tiny_hapt, tmp_path, pki):
    """hmf-cloud start and three hmf-device join processes, all over mqtts:// with client
    certificates and per-account passwords: one real round ends in metrics.jsonl."""
    cfg = RunConfig(data_dir=str(tiny_hapt), model="hapt", partition="iid", clients=3,
                    participants=3, rounds=1, local_epochs=1, batch_size=32, lr=5e-3,
                    hypernet_epochs=2, rank=16, hidden=32, seed=3, strategy="hypemefed")
    part = tmp_path / "part"
    fleet = write_partition(cfg, part)
    b = tls_broker(tmp_path, pki, [str(part / "fleet.json")], mutual=True)
    url = f"mqtts://localhost:{b.port}"
    tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"),
           "--tls-key", str(pki / "client.key")]
    procs: list[Proc] = []
    try:
        out = tmp_path / "run"
        procs.append(Proc("cloud", [
            "hmf-cloud", "start", "--broker", url, "--fleet", str(part / "fleet.json"),
            "--model", "hapt", "--strategy", cfg.strategy, "--rounds", "1",
            "--participants", "3", "--local-epochs", "1", "--batch-size", "32",
            "--lr", str(cfg.lr), "--hypernet-epochs", "2", "--rank", "16", "--hidden", "32",
            "--seed", "3", "--threads", "1", "--min-updates", "3", "--round-timeout", "60",
            "--out", str(out), "--password-file", str(b.secrets / "hmf-cloud.txt"),
            *tls], tmp_path / "cloud.log"))
        for d in fleet.devices:
            procs.append(Proc(d.id, [
                "hmf-device", "join", "--broker", url, "--device-id", d.id,
                "--data", str(part / f"{d.id}.npz"), "--work-dir", str(tmp_path / d.id),
                "--threads", "1", "--retry-s", "2",
                "--password-file", str(b.secrets / f"{d.id}.txt"), *tls],
                tmp_path / f"{d.id}.log"))
        cloud, devices = procs[0], procs[1:]
        assert cloud.wait(90) == 0, cloud.text() + "\nbroker:\n" + b.log()[-2000:]
        for dev in devices:
            assert dev.wait(20) == 0, dev.text()
            assert "update accepted" in dev.text()
        (row,) = read_metrics(out)
        assert row["round"] == 1 and row["participants"] == {"1": 1, "2": 1, "3": 1}
        assert "connected to the broker" in cloud.text()
    finally:
        for proc in procs:
            proc.stop()
        b.stop()
