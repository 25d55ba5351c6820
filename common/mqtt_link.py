"""One MQTT connection for the cloud or a device: paho-mqtt 2.x, QoS 1, reconnect with backoff,
and every callback reduced to putting an event on a queue.

Why a queue: paho runs callbacks on its network thread; any work there (training, aggregation,
even a slow disk write) stops keepalives and the broker drops the client. The owner of a
``Link`` reads ``events`` on its own thread and does the work there.
"""

from __future__ import annotations

import queue
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

QOS = 1


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
    ``("published", mid)``. Subscriptions are renewed on every (re)connect."""

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
        self.client.reconnect_delay_set(min_delay=1, max_delay=16)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert,
                                keyfile=settings.tls_key, cert_reqs=ssl.CERT_REQUIRED)
        if will:
            self.client.will_set(will[0], will[1], qos=QOS, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # -- paho callbacks: enqueue only -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self.events.put(("refused", str(reason)))
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=QOS)  # non-blocking: queues a SUBSCRIBE packet
        self.connected.set()
        self.events.put(("connected",))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected.clear()
        self.events.put(("disconnected", str(reason)))

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
