"""File upstream: signed evidence batches into a directory or onto a USB stick.

For sites without a network. Each batch becomes one file,
``<path>/<gateway id>/batch-<first>-<last>.json`` (12-digit ``seq`` numbers, so the
names sort in order), holding the same evidence batch message MQTT carries
(``ies_agent.upstream.payload``): the entries byte for byte and the signed
checkpoints that reach them. A batch file is written to a temporary name, fsynced,
renamed and the directory fsynced; that is its acknowledgement, and the cursor moves
only then. A stick that is not mounted (the directory is missing or read-only) is an
outage like any other: entries wait in the log. The gateway's key card is copied
beside the batches, so the stick carries what a verifier needs.

:func:`collect` reassembles a directory of batch files into ``evidence.jsonl`` +
``checkpoints.jsonl`` (one copy per ``seq``) for ``ies-agent verify``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ies_agent.upstream.delivery import Batch, Connector
from ies_agent.upstream.errors import LinkError
from ies_agent.upstream.payload import PayloadError, decode_batch, encode_block
from ies_agent.upstream.settings import UpstreamConfig

KEY_CARD = Path("keys") / "key-card.json"


class FileTransport:
    """Writes batches into ``config.path/<gateway id>/``."""

    kind = "file"

    def __init__(self, config: UpstreamConfig, *, gateway_id: str) -> None:
        assert config.path is not None
        self.config = config
        self.root = config.path
        self.directory = config.path / gateway_id
        self.target = str(config.path)
        self.connector: Connector | None = None

    def bind(self, connector: Connector) -> None:
        """Remember the connector (for the gateway id, origin and key card)."""
        self.connector = connector

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[FileSession]:
        """Check the target is there and writable; copy the key card.

        Raises :class:`LinkError` when the directory is missing (stick not
        mounted) or cannot be written.
        """
        if not self.root.is_dir():
            raise LinkError(f"{self.root} is not there (is the stick mounted?)")
        try:
            self.directory.mkdir(exist_ok=True)
            connector = self.connector
            if connector is not None:
                card = connector.source.data_dir / KEY_CARD
                if card.exists():
                    shutil.copyfile(card, self.directory / "key-card.json")
        except OSError as exc:
            raise LinkError(
                f"cannot write to {self.directory}: {exc.strerror}"
            ) from None
        yield FileSession(self)


class FileSession:
    """Writes one batch file per batch, each fsynced before it counts."""

    window = 1

    def __init__(self, transport: FileTransport) -> None:
        import asyncio

        self.transport = transport
        self.lost = asyncio.Event()
        self.lost_reason = ""

    async def send(self, batch: Batch) -> None:
        """Write ``batch`` atomically; raise :class:`LinkError` if the disk fails."""
        transport = self.transport
        connector = transport.connector
        assert connector is not None
        payload = encode_block(
            gw=connector.gateway_id,
            origin=connector.origin,
            first=batch.first,
            block=batch.block,
            count=batch.count,
            checkpoints=batch.checkpoints,
        )
        name = f"batch-{batch.first:012d}-{batch.last:012d}-c{batch.cp_end:06d}.json"
        path = transport.directory / name
        tmp = path.with_name("." + name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                if transport.config.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if transport.config.fsync:
                dir_fd = os.open(transport.directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise LinkError(f"cannot write {path}: {exc.strerror}") from None


def collect(directory: Path, out: Path) -> tuple[int, int]:
    """Reassemble batch files in ``directory`` into a verifiable directory ``out``.

    Writes ``out/evidence.jsonl`` (entries 0..n-1, one copy each) and
    ``out/checkpoints.jsonl``, and copies ``key-card.json`` to ``out/keys/``.
    Returns ``(entries, checkpoints)``. Raises :class:`PayloadError` for a batch
    file that does not parse, or when entries are missing (naming the first gap).
    """
    entries: dict[int, bytes] = {}
    checkpoints: dict[int, str] = {}
    for path in sorted(directory.glob("batch-*.json")):
        batch = decode_batch(path.read_bytes())
        for index, line in enumerate(batch.entries):
            entries.setdefault(batch.first + index, line)
        for size, note in batch.checkpoints:
            checkpoints.setdefault(size, note)
    count = len(entries)
    missing = next((seq for seq in range(count) if seq not in entries), None)
    if missing is not None:
        raise PayloadError(f"batches in {directory} lack entry {missing}")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "evidence.jsonl").open("wb") as stream:
        for seq in range(count):
            stream.write(entries[seq] + b"\n")
    from ies_agent.evidence.canonical import canonical_bytes

    with (out / "checkpoints.jsonl").open("wb") as stream:
        for size in sorted(checkpoints):
            stream.write(canonical_bytes({"note": checkpoints[size], "size": size}))
            stream.write(b"\n")
    card = directory / "key-card.json"
    if card.exists():
        (out / "keys").mkdir(exist_ok=True)
        shutil.copyfile(card, out / "keys" / "key-card.json")
    return count, len(checkpoints)
