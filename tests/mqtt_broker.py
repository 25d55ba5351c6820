"""A real mosquitto for tests: started on a free port with a temporary configuration, and able
to stop and restart on the same port (the broker-restart test)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Broker:
    """``conf`` is a full mosquitto configuration (with its listener) or None for an anonymous
    loopback listener on a free port."""

    def __init__(self, workdir: Path, conf: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        if conf is None:
            conf = workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                            "persistence false\nmax_queued_messages 100000\n")
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Broker:
        binary = mosquitto_binary()
        if binary is None:  # fail, never skip: the MQTT tests are the product's main use
            raise RuntimeError("mosquitto not found: install Debian's package mosquitto "
                               "(apt-get install mosquitto), as .ci/run does")
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 (kept for the process)
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start: "
                                   + (self.workdir / "mosquitto.log").read_text()[-2000:])
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")


# ---- processes of a fleet (cloud and devices run as their real console scripts) --------------

BIN = Path(sys.executable).parent


class Proc:
    """A console script run with its output in a file, so tests can wait for lines."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.log_path = name, log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log_file = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=self.log_file,
                                     stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60.0, after: int = 0) -> int:
        """Wait until ``needle`` appears in the output past offset ``after``; its end offset."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            i = text.find(needle, after)
            if i >= 0:
                return i + len(needle)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {needle!r} within {timeout}s; output:\n"
                             + self.text()[-4000:])

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s; output:\n"
                                 + self.text()[-4000:]) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_file.close()


def retained_presence(url: str, device: str) -> bytes:
    """The retained presence payload of ``device`` (hello or bye), read by a separate client."""
    from common import protocol as p
    from common.mqtt_link import Link, broker_settings

    watcher = Link("watcher", broker_settings(url), [p.device_topic(device, "presence")])
    watcher.start()
    try:
        ev = watcher.events.get(timeout=10)
        while ev[0] != "message":
            ev = watcher.events.get(timeout=10)
    finally:
        watcher.stop()
    return ev[2]


class RawClient:
    """A raw MQTT client in the test process (an anonymous broker lets it speak for anyone).
    Messages it is not waiting for are kept, so a later ``wait`` still finds them."""

    def __init__(self, url: str, client_id: str, topics: list[str]) -> None:
        from common.mqtt_link import Link, broker_settings

        self.link = Link(client_id, broker_settings(url), topics)
        self.link.start()
        assert self.link.connected.wait(10)
        self.seen: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload).wait_for_publish(5)

    def wait(self, topic: str, accept=lambda msg: True, timeout: float = 20.0) -> bytes:
        import queue

        for t, payload in self.seen:
            if t == topic and accept(payload):
                self.seen.remove((t, payload))
                return payload
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.link.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if ev[0] != "message":
                continue
            if ev[1] == topic and ev[2] and accept(ev[2]):
                return ev[2]
            self.seen.append((ev[1], ev[2]))
        raise AssertionError(f"nothing on {topic} within {timeout}s")
