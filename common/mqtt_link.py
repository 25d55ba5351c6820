"""One MQTT connection for the cloud or a device: paho-mqtt 2.x, QoS 1, reconnect with backoff,
and every callback reduced to putting an event on a queue.

Why a queue: paho runs callbacks on its network thread; any work there (training, aggregation,
even a slow disk write) stops keepalives and the broker drops the client. The owner of a
``Link`` reads ``events`` on its own thread and does the work there.
"""

from __future__ import annotations

import queue
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

QOS = 1
RETRY_MIN_S, RETRY_MAX_S = 1, 16  # paho's reconnect backoff: 1, 2, 4, 8, 16, 16, ... s


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 30


def broker_settings(url: str, username: str | None = None, password_file: str | None = None,
                    tls_ca: str | None = None, tls_cert: str | None = None,
                    tls_key: str | None = None) -> BrokerSettings:
    """``mqtt://HOST[:PORT]`` (1883) or ``mqtts://HOST[:PORT]`` (8883); the password is read
    from a file so it never shows in ``ps`` or shell history."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL must be mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}")
    tls = parts.scheme == "mqtts" or tls_ca is not None
    password = None
    if password_file:
        password = Path(password_file).read_text().strip()
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS)")
    return BrokerSettings(parts.hostname, parts.port or (8883 if tls else 1883), tls, username,
                          password, tls_ca, tls_cert, tls_key)


class Link:
    """A paho client whose callbacks only enqueue events:
    ``("connected",)``, ``("disconnected", reason)``, ``("message", topic, payload)``,
    ``("published", mid)``, and for a connection attempt that failed
    ``("unreachable", reason, retry_s)`` (no MQTT connection: refused port, unknown host,
    timeout, TLS) or ``("refused", reason, retry_s)`` (the broker said no, e.g. "Not
    authorized"), where ``retry_s`` is how long paho waits before the next attempt.
    Subscriptions are renewed on every (re)connect."""

    def __init__(self, client_id: str, settings: BrokerSettings,
                 subscriptions: list[str], will: tuple[str, bytes] | None = None,
                 max_inflight: int = 20) -> None:
        self.settings, self.subscriptions = settings, list(subscriptions)
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.connected = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id, clean_session=True)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=RETRY_MIN_S, max_delay=RETRY_MAX_S)
        self._waits = 0  # paho's backoff steps since the last successful connection
        self._first_attempt = True
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert,
                                keyfile=settings.tls_key, cert_reqs=ssl.CERT_REQUIRED)
        if will:
            self.client.will_set(will[0], will[1], qos=QOS, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # -- paho callbacks: enqueue only -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._first_attempt = False
        if reason.is_failure:
            self.events.put(("refused", str(reason), self._next_wait()))
            return
        self._waits = 0
        for topic in self.subscriptions:
            client.subscribe(topic, qos=QOS)  # non-blocking: queues a SUBSCRIBE packet
        self.connected.set()
        self.events.put(("connected",))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if self.connected.is_set():  # a lost connection: paho waits once before retrying
            self._next_wait()
        self.connected.clear()
        self.events.put(("disconnected", str(reason)))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its ``except OSError`` block: the error is the reason.
        # After a failed first attempt paho 2.x waits twice (1 s, then 2 s) before the next.
        wait = self._next_wait() + (self._next_wait() if self._first_attempt else 0)
        self._first_attempt = False
        self.events.put(("unreachable", describe_error(sys.exc_info()[1]), wait))

    def _next_wait(self) -> int:
        """The wait paho is about to start: it doubles after each failure in a row."""
        self._waits += 1
        return min(RETRY_MIN_S * 2 ** (self._waits - 1), RETRY_MAX_S)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.events.put(("message", msg.topic, msg.payload))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        self.events.put(("published", mid))

    # -- owner's side -----------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; paho's thread retries with backoff until stopped."""
        self.client.connect_async(self.settings.host, self.settings.port,
                                  keepalive=self.settings.keepalive)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=QOS, retain=retain)

    def stop(self, last: tuple[str, bytes] | None = None, timeout: float = 3.0) -> None:
        """Publish ``last`` (retained, e.g. a goodbye) if connected, then disconnect cleanly."""
        if last and self.connected.is_set():
            info = self.publish(last[0], last[1], retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


def describe_error(e: BaseException | None) -> str:
    """Why a connection attempt failed, in a few words ("connection refused", "timed out")."""
    if e is None:
        return "no connection"
    if isinstance(e, socket.gaierror):
        return f"unknown host ({e.strerror or e})"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__
