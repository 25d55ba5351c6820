"""``hmf-device join``: take part in a real fleet over MQTT (agent: device/agent.py).

Heavy imports (torch, paho) happen when the command runs, so the other ``hmf-device`` commands
start fast."""

from __future__ import annotations

import click


@click.command("join")
@click.option("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT.")
@click.option("--device-id", required=True, help="This device's id (its broker user name).")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="NPZ with x (float32) and y (int64), optionally test_x and test_y.")
@click.option("--tier", type=click.IntRange(1, 3), default=None,
              help="Deepest tier this device can train; deeper tasks are refused.")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="Where the device keeps its last update until the cloud has it.")
@click.option("--username", default=None, help="Broker user name (default: the device id "
                                                 "when --password-file is given).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads for training [default: torch's].")
@click.option("--retry-s", type=float, default=10.0, show_default=True,
              help="Repeat a request after this long without an answer.")
@click.option("--stay", is_flag=True, help="Keep waiting for a new run when this one ends.")
def join(broker: str, device_id: str, data_path: str, tier: int | None, work_dir: str,
         username: str | None, password_file: str | None, tls_ca: str | None,
         tls_cert: str | None, tls_key: str | None, threads: int | None, retry_s: float,
         stay: bool) -> None:
    """Join a fleet: announce, train what the cloud assigns, upload, repeat until the run ends."""
    import torch

    from common import protocol as p
    from common.mqtt_link import broker_settings
    from device.agent import DeviceAgent, load_device_data

    try:
        p.check_device_id(device_id)
        settings = broker_settings(broker, username or (device_id if password_file else None),
                                   password_file, tls_ca, tls_cert, tls_key)
        data = load_device_data(data_path)
    except (ValueError, p.ProtocolError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if threads:
        torch.set_num_threads(threads)
    agent = DeviceAgent(device_id, settings, data, work_dir, tier, retry_s, stay,
                        log=lambda line: click.echo(line))
    raise SystemExit(agent.run())

