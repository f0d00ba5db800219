"""Read the evidence log and its checkpoints from disk, in batches, from any ``seq``.

Connectors never hold entries in memory beyond the batch they send: they read
``evidence.jsonl`` at the byte offset of their send position with ``pread(2)`` and
take whole lines only, so an entry the writer is still appending is never sent half.
Entries are taken as they are on disk (their bytes are what the checkpoints sign).

Finding the offset of a ``seq`` after a restart costs one scan of the log up to it
(``bytes.count`` of newlines, about 1 GB/s); a sparse index of every 1024th entry
seen makes later rewinds (end-to-end resends, reconnects) cheap.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ies_agent.upstream.errors import UpstreamError

LOG_FILE = "evidence.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
_INDEX_EVERY = 1024
_SCAN_CHUNK = 1 << 20


class LogReadError(UpstreamError):
    """The evidence log on disk is not what the reader expects at a position.

    Raised when the line at a position does not carry the expected ``seq`` (the log
    was replaced or edited under a running agent). Delivery stops for that upstream
    and says so; it never skips entries.
    """


@dataclass
class Chunk:
    """Whole entry lines ``first..last`` read from ``start`` up to ``end`` (bytes).

    ``block`` holds the lines as on disk, each ending in a newline; ``count`` is
    how many.
    """

    first: int
    block: bytes
    count: int
    start: int
    end: int

    @property
    def last(self) -> int:
        """``seq`` of the last line (``first - 1`` when empty)."""
        return self.first + self.count - 1

    @property
    def lines(self) -> list[bytes]:
        """The entry lines without their newlines."""
        return self.block.split(b"\n")[:-1]


@dataclass
class _CheckpointIndex:
    sizes: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    end: int = 0


class LogReader:
    """Reads one data directory's ``evidence.jsonl`` and ``checkpoints.jsonl``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir / LOG_FILE
        self.checkpoints_path = self.data_dir / CHECKPOINTS_FILE
        self._fd: int | None = None
        self._index_seqs: list[int] = [0]
        self._index_offsets: list[int] = [0]
        self._end_seq = 0  # lines known to exist: 0 .. _end_seq - 1
        self._end_offset = 0
        self._cp = _CheckpointIndex()
        self._line_bytes = 512.0  # running estimate of an entry's length

    def close(self) -> None:
        """Close the log file (reopened on the next read)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- entries ----------------------------------------------------------------------

    def log_id(self) -> str:
        """Identify the log: base64 SHA-256 of its first line ("" while empty)."""
        first = self._pread(0, 64 * 1024)
        newline = first.find(b"\n")
        if newline < 0:
            return ""
        return base64.b64encode(hashlib.sha256(first[:newline]).digest()).decode()

    def count(self) -> int:
        """Return how many complete entry lines the file holds now."""
        self._scan_to(None)
        return self._end_seq

    def size_bytes(self) -> int:
        """Return the byte length of the complete lines of the log."""
        self._scan_to(None)
        return self._end_offset

    def locate(self, seq: int, hint: int = 0) -> int:
        """Return the byte offset where entry ``seq`` starts.

        ``hint`` (a stored offset) is used when the line there carries ``seq``.
        ``seq`` may be the next entry to come (the offset is then the end). Raises
        :class:`LogReadError` when the log holds fewer than ``seq`` entries.
        """
        if hint > 0 and self._seq_at(hint) == seq:
            self._remember(seq, hint)
            return hint
        if seq == 0:
            return 0
        pos = bisect.bisect_right(self._index_seqs, seq) - 1
        at_seq, offset = self._index_seqs[pos], self._index_offsets[pos]
        if at_seq < self._end_seq <= seq:
            at_seq, offset = self._end_seq, self._end_offset
        while at_seq < seq:
            data = self._pread(offset, _SCAN_CHUNK)
            if not data:
                raise LogReadError(
                    f"{self.log_path} holds {at_seq} entries, fewer than the "
                    f"{seq} an upstream cursor counts; the log was replaced"
                )
            start = 0
            while at_seq < seq:
                newline = data.find(b"\n", start)
                if newline < 0:
                    break
                at_seq += 1
                start = newline + 1
                self._remember(at_seq, offset + start)
            if start == 0:
                raise LogReadError(f"{self.log_path}: a line longer than 1 MiB")
            offset += start
        return offset

    def read(
        self,
        seq: int,
        offset: int,
        *,
        upto: int,
        max_entries: int,
        max_bytes: int,
    ) -> Chunk:
        """Read whole lines from entry ``seq`` at ``offset``, at most up to ``upto``.

        Takes at most ``max_entries`` lines and ``max_bytes`` bytes of lines (but
        always one line, however long, when one is there). ``upto`` is the highest
        ``seq`` that may be read (the durable end). Checks that the first and last
        lines carry the expected ``seq``; raises :class:`LogReadError` otherwise.
        """
        want = min(max_entries, upto - seq + 1)
        if want <= 0:
            return Chunk(seq, b"", 0, offset, offset)
        # Read about what ``want`` lines take, not always ``max_bytes``.
        guess = int(self._line_bytes * want * 1.25) + 4096
        data = self._pread(offset, min(max_bytes, guess))
        cut = data.rfind(b"\n") + 1  # whole lines only
        if cut == 0 and data:
            # One entry longer than max_bytes: read it whole.
            data = self._read_line(offset)
            cut = len(data) if data.endswith(b"\n") else 0
        block = data[:cut]
        count = block.count(b"\n")
        if count > want:
            pos = -1
            for _ in range(want):
                pos = block.index(b"\n", pos + 1)
            block, count = block[: pos + 1], want
        end = offset + len(block)
        if count:
            self._line_bytes = 0.8 * self._line_bytes + 0.2 * (len(block) / count)
        chunk = Chunk(seq, block, count, offset, end)
        if count:
            first_end = block.index(b"\n")
            self._check_seq(block[:first_end], seq, offset)
            if count > 1:
                last_start = block.rindex(b"\n", 0, len(block) - 1) + 1
                self._check_seq(block[last_start:-1], chunk.last, offset + last_start)
            self._remember(chunk.last + 1, end)
        return chunk

    def history(self, seq: int, count: int) -> list[bytes]:
        """Return up to ``count`` entry lines just before ``seq`` (oldest first)."""
        first = max(0, seq - count)
        offset = self.locate(first)
        chunk = self.read(
            first, offset, upto=seq - 1, max_entries=count, max_bytes=64 << 20
        )
        return chunk.lines

    def last_event(self, seq: int, ev: str) -> dict[str, Any] | None:
        """Return the last ``ev`` event entry before entry ``seq``, or None.

        Scans the log backwards from ``seq`` in 1 MiB steps (stateful encoders use
        it to learn the ``boot`` settings that apply to an entry). Raises
        :class:`LogReadError` when the log holds fewer than ``seq`` entries.
        """
        needle = b'"ev":' + json.dumps(ev).encode()
        high = self.locate(seq)
        while high > 0:
            low = max(0, high - _SCAN_CHUNK)
            data = self._pread(low, high - low)
            pos = data.rfind(needle)
            while pos >= 0:
                start = data.rfind(b"\n", 0, pos) + 1
                if start == 0 and low > 0:
                    break  # the line begins before this window: seen in the next
                end = data.find(b"\n", pos)
                try:
                    entry = json.loads(data[start:end])
                except ValueError:
                    entry = None
                if isinstance(entry, dict) and entry.get("ev") == ev:
                    return entry
                pos = data.rfind(needle, 0, start)
            first_newline = data.find(b"\n")
            if low == 0 or first_newline < 0:
                return None
            high = low + first_newline + 1
        return None

    # --- checkpoints ------------------------------------------------------------------

    def checkpoint_count(self) -> int:
        """Return how many complete lines ``checkpoints.jsonl`` holds now."""
        self._scan_checkpoints()
        return len(self._cp.sizes)

    def checkpoint_size(self, index: int) -> int:
        """Return the log size checkpoint number ``index`` signs."""
        self._scan_checkpoints()
        return self._cp.sizes[index]

    def checkpoints_covering(self, size: int) -> int:
        """Return how many checkpoints sign a size of at most ``size``."""
        self._scan_checkpoints()
        return bisect.bisect_right(self._cp.sizes, size)

    def checkpoints(self, start: int, stop: int) -> list[tuple[int, str]]:
        """Return checkpoints ``start`` .. ``stop - 1`` as ``(size, note)`` pairs."""
        self._scan_checkpoints()
        if start >= stop:
            return []
        begin = self._cp.offsets[start]
        finish = (
            self._cp.offsets[stop] if stop < len(self._cp.offsets) else self._cp.end
        )
        with self.checkpoints_path.open("rb") as stream:
            stream.seek(begin)
            data = stream.read(finish - begin)
        result = []
        for line in data.splitlines():
            item = json.loads(line)
            result.append((int(item["size"]), str(item["note"])))
        return result

    def _scan_checkpoints(self) -> None:
        cp = self._cp
        try:
            with self.checkpoints_path.open("rb") as stream:
                stream.seek(cp.end)
                data = stream.read()
        except FileNotFoundError:
            return
        offset = cp.end
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            try:
                item = json.loads(raw)
                size = item["size"]
                if not isinstance(size, int) or not isinstance(item["note"], str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                offset += len(raw)
                continue
            cp.sizes.append(size)
            cp.offsets.append(offset)
            offset += len(raw)
        cp.end = offset

    # --- internals --------------------------------------------------------------------

    def _pread(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            try:
                self._fd = os.open(self.log_path, os.O_RDONLY)
            except FileNotFoundError:
                return b""
        return os.pread(self._fd, length, offset)

    def _read_line(self, offset: int) -> bytes:
        parts: list[bytes] = []
        while True:
            data = self._pread(offset, _SCAN_CHUNK)
            if not data:
                return b"".join(parts)
            newline = data.find(b"\n")
            if newline >= 0:
                parts.append(data[: newline + 1])
                return b"".join(parts)
            parts.append(data)
            offset += len(data)

    def _seq_at(self, offset: int) -> int | None:
        line = self._read_line(offset)
        if not line.endswith(b"\n"):
            return None
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            return None
        return seq if isinstance(seq, int) else None

    def _check_seq(self, line: bytes, seq: int, offset: int) -> None:
        try:
            found = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            found = None
        if found != seq:
            raise LogReadError(
                f"{self.log_path} at byte {offset}: expected entry {seq}, found "
                f"{found!r}; the log changed under the agent. Delivery to this "
                f"upstream stops; run `ies-agent verify {self.data_dir}`"
            )

    def _remember(self, seq: int, offset: int) -> None:
        if seq > self._end_seq:
            self._end_seq, self._end_offset = seq, offset
        if seq % _INDEX_EVERY == 0 and seq > self._index_seqs[-1]:
            self._index_seqs.append(seq)
            self._index_offsets.append(offset)

    def _scan_to(self, limit: int | None) -> None:
        """Extend the known end of the log by counting complete lines."""
        seq, offset = self._end_seq, self._end_offset
        while limit is None or seq < limit:
            data = self._pread(offset, _SCAN_CHUNK)
            last = data.rfind(b"\n")
            if last < 0:
                break
            seq += data.count(b"\n", 0, last + 1)
            offset += last + 1
            self._remember(seq, offset)
