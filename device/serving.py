"""A device's copy of the latest global model: the cloud's ONNX graphs of this device's tier,
fetched over MQTT, verified and switched in atomically (docs/PROTOCOL.md, "Serving the latest
model").

Layout of the model directory (``WORK_DIR/model`` for ``hmf-device join``)::

    RUN-round_N/           a complete model: exit_k and segment_k for k <= tier, manifest.json
    RUN-round_N.partial/   a download in progress; never served, deleted at the next start
    current -> RUN-round_N a symlink, replaced atomically: what ``hmf-device predict`` runs

Every file name written comes from ``GRAPH_FILE`` (checked by the protocol and again here) or is
``manifest.json``, and always lands in this directory: nothing from the network names a path.
Each file is checked against the sha256 that the ``model`` message announced as it arrives, and
all of them again from disk (``device.runtime.Manifest``) before ``current`` moves.

``ModelFetcher`` speaks no MQTT: it takes validated messages and chunks and returns the
``fetch_graph`` request to publish, if any. The agent wires it to its link; tests drive it
directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import protocol as p
from device.runtime import MANIFEST, Manifest

CURRENT = "current"
PARTIAL = ".partial"
MAX_MODEL_BYTES = 1024 * 1024 * 1024  # all files of one served model, on this device
DISK_MARGIN = 64 * 1024 * 1024  # free space left after a download
_ROUND_DIR = re.compile(r"[A-Za-z0-9_-]{1,64}-round_[0-9]+")


def _safe_name(name: str) -> str:
    """A bare file name this module may write (the protocol checked it already: defence in
    depth, since a wrong name here would write outside the model directory)."""
    if name != MANIFEST and not p.GRAPH_FILE.fullmatch(name):
        raise p.ProtocolError("bad field", f"file name {name[:80]!r}")
    return name


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """Make a rename or a new symlink in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass
class _Download:
    """One model being fetched, one blob at a time: manifest.json first, then the graphs."""

    run: str
    round: int
    model: str
    announced: list[p.GraphFile]  # every file of the cloud's model message
    wanted: list[tuple[str, p.BlobRef]]  # (file name, blob) this device fetches, in order
    directory: Path
    position: int = 0
    manifest: dict[str, Any] | None = None
    reassembly: p.Reassembly = field(init=False)

    def __post_init__(self) -> None:
        self.reassembly = p.Reassembly(self.wanted[0][1])

    @property
    def name(self) -> str:
        return self.wanted[self.position][0]

    @property
    def done_shas(self) -> set[str]:
        return {ref.sha256 for _, ref in self.wanted[: self.position]}

    @property
    def size(self) -> int:
        return sum(ref.size for _, ref in self.wanted)


class ModelFetcher:
    """Keeps ``root/current`` pointing at the newest complete model the cloud announced.

    ``tier``: fetch exits and segments up to it (None: every one served); ``precisions``: which
    graphs to fetch (``fp32``, ``int8``); ``retry_s``: ask again for missing chunks after this
    long without progress."""

    def __init__(self, root: str | Path, device: str, tier: int | None = None,
                 precisions: tuple[str, ...] = ("fp32",), retry_s: float = 10.0,
                 log: Callable[[str], None] = print,
                 max_bytes: int = MAX_MODEL_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.device, self.tier, self.precisions = p.check_device_id(device), tier, precisions
        self.retry_s, self.log, self.max_bytes = retry_s, log, max_bytes
        self.download: _Download | None = None
        self.last_request = 0.0
        self._remove_partials()
        self.held = self._read_held()  # (run, round) that current points at

    @property
    def current(self) -> Path | None:
        """The directory being served now, or None."""
        link = self.root / CURRENT
        return link.resolve() if link.is_symlink() and link.exists() else None

    # ------------------------------------------------------------------ events
    def on_model(self, msg: dict[str, Any]) -> bytes | None:
        """A validated ``model`` message: start fetching it if it is newer than what this
        device holds or fetches. Returns the first request, or None."""
        key = (msg["run"], msg["round"])
        fetching = (self.download.run, self.download.round) if self.download else None
        if key == fetching:
            return None  # a repeated message of the model being fetched
        for newest in (fetching, self.held):  # older than either: refused, even if held
            if newest is not None and newest[0] == key[0] and key[1] < newest[1]:
                raise p.ProtocolError("stale round", f"model of round {key[1]}, already have "
                                                     f"round {newest[1]}")
        if key == self.held:
            return None  # the retained message again (after a reconnect or a restart)
        files = self._wanted(msg["files"])
        if not files:
            self.log(f"{self.device}: round {msg['round']}'s model has no "
                     f"{'/'.join(self.precisions)} graphs for tier {self.tier or 'any'}: "
                     "keeping the current one")
            return None
        wanted = [(MANIFEST, msg["manifest"])] + [(f.file, f.blob) for f in files]
        size = sum(ref.size for _, ref in wanted)
        if size > self.max_bytes:
            raise p.ProtocolError("oversized model", f"{size} bytes > {self.max_bytes}")
        if not self._room_for(size, msg["round"]):
            return None
        self._abandon()
        directory = self.root / f"{msg['run']}-round_{msg['round']}{PARTIAL}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        self.download = _Download(msg["run"], msg["round"], msg["model"], msg["files"], wanted,
                                  directory)
        self.log(f"{self.device}: round {msg['round']}'s model: fetching {len(files)} graph(s) "
                 f"for tier {self.tier or 'any'} ({size / 1e6:.1f} MB)")
        return self._request()

    def on_chunk(self, chunk: p.Chunk) -> bytes | None:
        """A chunk on this device's ``graphs`` topic; returns the next request, if any."""
        d = self.download
        if d is None:
            return None  # a late repeat of something already installed
        ref = d.wanted[d.position][1]
        if chunk.sha256 != ref.sha256 and chunk.sha256 in d.done_shas:
            return None  # a late repeat of a file already stored
        if chunk.sha256 != ref.sha256 or (chunk.run, chunk.round) != (d.run, d.round):
            raise p.ProtocolError("unexpected blob", f"{chunk.sha256[:16]} of {chunk.run}/"
                                                     f"{chunk.round}")
        d.reassembly.add(chunk)  # ProtocolError if it does not fit the announced blob
        self.last_request = time.monotonic()  # progress: no need to ask again yet
        if not d.reassembly.complete:
            return None
        try:
            blob = d.reassembly.blob()
        except p.ProtocolError as e:  # right headers, wrong bytes: not saved, fetched again
            self.log(f"{self.device}: {d.name} of round {d.round}: {e}: fetching it again")
            d.reassembly = p.Reassembly(ref)
            return self._request()
        return self._store(blob)

    def retry(self) -> bytes | None:
        """The request to repeat when a download made no progress for ``retry_s``."""
        d = self.download
        if d is None or time.monotonic() - self.last_request < self.retry_s:
            return None
        self.log(f"{self.device}: {d.name} of round {d.round} incomplete: asking again")
        return self._request()

    def reconnected(self) -> None:
        """After a (re)connect the cloud may have lost queued chunks: ask again at once."""
        self.last_request = 0.0

    # ------------------------------------------------------------------ fetching
    def _wanted(self, files: list[p.GraphFile]) -> list[p.GraphFile]:
        """The graphs of this device's tier at its precisions; for int8, also the fp32 graphs
        whose int8 version the export left out (it lost accuracy: they run in fp32)."""
        deepest = self.tier or 3
        have = {(f.kind, f.index, f.precision) for f in files}
        return [f for f in files if f.index <= deepest and (
            f.precision in self.precisions
            or (f.precision == "fp32" and "int8" in self.precisions
                and (f.kind, f.index, "int8") not in have))]

    def _room_for(self, size: int, server_round: int) -> bool:
        free = shutil.disk_usage(self.root).free
        if size + DISK_MARGIN <= free:
            return True
        self.log(f"{self.device}: round {server_round}'s model needs {size / 1e6:.1f} MB and "
                 f"{free / 1e6:.1f} MB are free: keeping the current one")
        return False

    def _request(self) -> bytes:
        d = self.download
        assert d is not None
        r = d.reassembly
        self.last_request = time.monotonic()
        return p.make_control("fetch_graph", run=d.run, round=d.round, device=self.device,
                              sha256=r.ref.sha256, missing=r.missing() if r.have else None)

    def _store(self, blob: bytes) -> bytes | None:
        """Keep a verified blob and ask for the next one, or install the finished model."""
        d = self.download
        assert d is not None
        try:
            if d.name == MANIFEST:
                d.manifest = self._checked_manifest(blob, d)
            else:
                _write_synced(d.directory / _safe_name(d.name), blob)
        except p.ProtocolError:
            self._abandon()  # an inconsistent model: wait for the next message
            raise
        except OSError as e:
            self.log(f"{self.device}: cannot write {d.name} ({e}): round {d.round} abandoned")
            self._abandon()
            return None
        d.position += 1
        if d.position < len(d.wanted):
            d.reassembly = p.Reassembly(d.wanted[d.position][1])
            return self._request()
        self._install()
        return None

    def _checked_manifest(self, blob: bytes, d: _Download) -> dict[str, Any]:
        """The cloud's manifest, which must list exactly the files of its model message."""
        try:
            manifest = json.loads(blob, parse_constant=_no_constants)
            listed = {(e["file"], e["kind"], e["index"], e["precision"], e["sha256"],
                       e["bytes"]) for e in manifest["files"]}
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise p.ProtocolError("bad manifest", str(e)[:120]) from None
        announced = {(f.file, f.kind, f.index, f.precision, f.blob.sha256, f.blob.size)
                     for f in d.announced}
        if manifest.get("format") != p.GRAPH_FORMAT or manifest.get("model") != d.model:
            raise p.ProtocolError("bad manifest", f"format {manifest.get('format')!r}, model "
                                                  f"{manifest.get('model')!r}")
        if listed != announced:
            raise p.ProtocolError("bad manifest", "its files differ from the model message's")
        return manifest

    # ------------------------------------------------------------------ installing
    def _install(self) -> None:
        """Write this device's manifest, verify every file from disk, then switch ``current``."""
        d = self.download
        assert d is not None and d.manifest is not None
        final = self.root / d.directory.name[: -len(PARTIAL)]
        try:
            _write_synced(d.directory / MANIFEST, self._device_manifest(d))
            Manifest.load(d.directory, verify=True)  # every sha256 again, from disk
            shutil.rmtree(final, ignore_errors=True)  # a leftover of an interrupted switch
            os.rename(d.directory, final)
            previous = self.current
            self._point_current_at(final.name)
        except (OSError, ValueError, RecursionError) as e:  # ManifestError is a ValueError
            self.log(f"{self.device}: cannot install round {d.round}'s model ({e}): keeping "
                     "the current one")
            self._abandon()
            return
        self.held, self.download = (d.run, d.round), None
        self._prune({final.name, previous.name if previous else ""})
        self.log(f"{self.device}: serving round {d.round}'s model: {len(d.wanted) - 1} graph(s) "
                 f"in {final} ({self.root / CURRENT} points at it)")

    def _device_manifest(self, d: _Download) -> bytes:
        """The cloud's manifest cut to the files fetched, so ``Manifest.verify`` checks exactly
        them, plus where it came from."""
        assert d.manifest is not None
        kept = {name for name, _ in d.wanted}
        files = [e for e in d.manifest["files"] if e["file"] in kept]
        exits = sorted({e["index"] for e in files if e["kind"] == "exit"})
        precisions = [q for q in ("fp32", "int8") if any(e["precision"] == q for e in files)]
        # calibration.npz is not served: the device's manifest must not promise it
        manifest = {**d.manifest, "files": files, "tiers": exits, "precisions": precisions,
                    "calibration": None,
                    "served": {"run": d.run, "round": d.round, "device": self.device,
                               "tier": self.tier, "manifest_sha256": d.wanted[0][1].sha256,
                               "fetched_unix": time.time()}}
        return (json.dumps(manifest, indent=2) + "\n").encode()

    def _point_current_at(self, name: str) -> None:
        """Replace the ``current`` symlink in one step: a reader sees the old or the new model,
        never a mix or nothing."""
        tmp = self.root / f"{CURRENT}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)  # relative: the work directory may move
        os.replace(tmp, self.root / CURRENT)
        _sync_dir(self.root)

    def _prune(self, keep: set[str]) -> None:
        """Delete older models, keeping the current one and the one before it (a predict run
        that opened the previous model keeps working)."""
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink() and entry.name not in keep \
                    and _ROUND_DIR.fullmatch(entry.name):
                shutil.rmtree(entry, ignore_errors=True)

    def _abandon(self) -> None:
        if self.download is not None:
            shutil.rmtree(self.download.directory, ignore_errors=True)
        self.download = None

    def _remove_partials(self) -> None:
        for entry in self.root.glob(f"*{PARTIAL}"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    def _read_held(self) -> tuple[str, int] | None:
        """(run, round) of the model ``current`` points at, from its manifest."""
        current = self.current
        if current is None:
            return None
        try:
            served = json.loads((current / MANIFEST).read_text())["served"]
            return str(served["run"]), int(served["round"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


__all__ = ["CURRENT", "ModelFetcher"]
