"""The offline verifier of evidence logs and disclosure bundles.

Pure Python plus ``cryptography``: everything a utility needs is the log (or a bundle
from ``ies-agent prove``) and the gateway's registered public key. :func:`verify_path`
accepts

* a data directory (``evidence.jsonl``, ``checkpoints.jsonl``, ``keys/key-card.json``),
* a directory laid out like the worked example (``entries.jsonl``, ``*.note``,
  ``*.vkey``),
* the log file of such a directory (checkpoints and keys are taken from there; any
  other log file needs ``--checkpoint`` and ``--key``: nothing is ever picked up from
  the directory a lone file happens to be in), or
* a disclosure bundle (JSON with ``entry``, ``leaf_index``, ``tree_size``, ``proof``,
  ``checkpoint``): any ``*.json`` file, or a file whose first line starts with ``{``
  but is no entry. A damaged bundle fails as ``bundle_malformed``; it is never read
  as a log.

It returns a :class:`Report` of :class:`Finding` s, each naming the ``seq`` it concerns.
Errors are integrity failures: an entry whose bytes are not canonical or were altered,
entries missing, duplicated or out of order, lines that are no entry at all (named by
line number: they add no entry), a checkpoint whose signature or root does not hold,
checkpoints that shrink, a log shorter than a checkpoint signed earlier (rollback), a
``checkpoint`` event without its signed note (``checkpoints.jsonl`` deleted, cut or
edited). Warnings are what a reader should know but that does not break the evidence:
entries not yet covered by a checkpoint, a key taken from the directory instead of
pinned, a retired key that a pinned key vouched for, crash recoveries, the one note a
crash can leave unsigned (that of the last checkpoint event before an unclean restart
or at the end of the log), interval slots without a reading (explained by a read error
or an outage, or not), cumulative registers that go down, clock steps.

How an altered entry is named. Entries written by the agent carry ``prev``, the SHA-256
of the line before; changing any byte of entry N changes its hash, so entry N+1's
``prev`` no longer matches and N is named. When the ``prev`` field itself was changed,
the links on both sides of that entry break and the entry between them is named. The
last entry has no successor: there the root of the covering checkpoint fails and the
finding names the last signed entry. Entries without ``prev`` (the worked example) can
only be placed within the range between two checkpoints.

Interval slots are aligned to the local wall clock of the boot event's ``tz``
(``(t + utc offset) mod interval``), as the scheduler does in zones without daylight
saving.

Cost. The log is read once, front to back; per entry about 50 bytes stay in memory
(its reported ``seq``, leaf hash and time), so logs larger than memory verify. Every
entry is parsed and re-encoded to prove its bytes canonical and hashed twice (leaf and
``prev``); every checkpoint signature is verified. ``bench/bench_verify.py`` measures
the throughput.

Errors::

    EvidenceError (ies_agent.evidence.errors)
    └── VerifyInputError   PATH, a key file or a reference checkpoint cannot be used
                           at all (missing, not a log, not a key): a usage problem,
                           not a finding about the evidence
"""

from __future__ import annotations

import base64
import bisect
import gc
import hashlib
import json
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeGuard
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ies_agent.evidence import merkle, note
from ies_agent.evidence.canonical import parse_entry
from ies_agent.evidence.errors import (
    EvidenceError,
    EvidenceFormatError,
    NoteError,
    ProofError,
)

ERROR = "error"
WARNING = "warning"

LOG_FILE = "evidence.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
KEY_CARD = Path("keys") / "key-card.json"
EXAMPLE_LOG_FILE = "entries.jsonl"

TIME_STEP_LIMIT_MS = 2000
"""Disagreement (ms) between wall-clock and monotonic time that counts as a step."""
TIME_STEP_LOOKAHEAD = 4
"""Entries after a step within which a ``time_step``/``time_sync`` event explains it."""

READING_STATES = frozenset("GNTESL")
TIME_QUALITIES = frozenset("SIU")
EXPLAINS_CUMULATIVE = frozenset({"read_error", "config_change", "source"})
"""Events (for the same source; ``config_change`` for all) that explain a decrease."""


class VerifyInputError(EvidenceError):
    """PATH, a key file or a reference checkpoint cannot be used at all."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of verification, about the entry ``seq`` (``None``: the whole log)."""

    seq: int | None
    severity: str
    """``error`` (integrity failure) or ``warning``."""
    code: str
    """Stable machine name, e.g. ``altered``, ``missing``, ``unprotected``."""
    message: str

    def line(self, whole: str = "log") -> str:
        """Return the finding as one human-readable line; ``whole`` names what a
        finding without ``seq`` is about (``log`` or ``bundle``)."""
        where = f"seq {self.seq}" if self.seq is not None else whole
        return f"{where}: {self.severity}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        """Return the finding as a JSON-ready dict."""
        return {
            "seq": self.seq,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
        }


@dataclass
class Report:
    """What verification of one PATH found."""

    path: str
    kind: str
    """``log`` or ``bundle``."""
    entries: int = 0
    """Complete entry lines read, lines that are no entry at all not counted (a
    bundle has one)."""
    checkpoints: int = 0
    """Checkpoints read."""
    signed_size: int = 0
    """Entries covered by the largest checkpoint that verified."""
    trusted_keys: list[str] = field(default_factory=list)
    """Labels (``name+keyid``) of the keys trusted for this run."""
    pinned: bool = True
    """False when the keys came from the directory itself, not from ``--key``."""
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity ``error``."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        """Findings of severity ``warning``."""
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when no integrity failure was found (warnings allowed)."""
        return not any(f.severity == ERROR for f in self.findings)

    def summary(self) -> str:
        """Return a one-line verdict with counts."""
        verdict = "OK" if self.ok else "FAILED"
        errors, warnings = len(self.errors), len(self.warnings)
        if self.kind == "bundle":
            what = "disclosure bundle"
        else:
            what = (
                f"{self.entries} entries, {self.checkpoints} checkpoints, "
                f"signed through seq {self.signed_size - 1}"
                if self.signed_size
                else f"{self.entries} entries, {self.checkpoints} checkpoints, "
                "none signed"
            )
        keys = ", ".join(self.trusted_keys) or "none"
        pinned = "" if self.pinned else " (not pinned)"
        return (
            f"{verdict}: {errors} error{'s' * (errors != 1)}, {warnings} "
            f"warning{'s' * (warnings != 1)}; {what}; keys: {keys}{pinned}"
        )

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return {
            "path": self.path,
            "kind": self.kind,
            "ok": self.ok,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "signed_size": self.signed_size,
            "trusted_keys": self.trusted_keys,
            "pinned": self.pinned,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [f.to_json() for f in self.findings],
        }


# --- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A signed checkpoint as read from a file, before it is checked."""

    note: str
    declared_size: int | None
    """The ``size`` written beside the note in ``checkpoints.jsonl``, if any."""
    where: str
    """Where it came from, for messages (``checkpoints.jsonl line 3``)."""
    problem: str | None = None
    """Why the line is not a checkpoint record (``note`` is then empty)."""


def load_verifiers(path: Path) -> list[note.NoteVerifier]:
    """Read the keys in ``path``: a signed-note verifier key (one per line) or a key
    card (JSON with ``vkey`` and optionally ``retired`` keys, each with ``vkey``).

    Raises ``VerifyInputError`` when the file cannot be read or holds no usable key.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VerifyInputError(f"cannot read key file {path}: {exc}") from None
    vkeys: list[str] = []
    if text.lstrip().startswith("{"):
        try:
            card = json.loads(text)
        except ValueError:
            raise VerifyInputError(f"key card {path} is not valid JSON") from None
        if not isinstance(card, dict) or not isinstance(card.get("vkey"), str):
            raise VerifyInputError(
                f"key card {path} has no 'vkey' (signed-note verifier key)"
            )
        vkeys.append(card["vkey"])
        for retired in card.get("retired") or []:
            if isinstance(retired, dict) and isinstance(retired.get("vkey"), str):
                vkeys.append(retired["vkey"])
    else:
        vkeys = [line for line in text.splitlines() if line.strip()]
    if not vkeys:
        raise VerifyInputError(f"key file {path} holds no key")
    verifiers = []
    for vkey in vkeys:
        try:
            verifiers.append(note.parse_vkey(vkey))
        except NoteError as exc:
            raise VerifyInputError(f"key file {path}: {exc}") from None
    return verifiers


def read_checkpoint_file(path: Path) -> list[CheckpointRecord]:
    """Read checkpoints from ``path``: a ``checkpoints.jsonl`` or one signed note.

    A torn last line of ``checkpoints.jsonl`` (no newline) and blank lines at the end
    of either kind of file are skipped; any other line that is not a record is kept
    as a record with ``problem`` set (the verifier reports it). Raises
    ``VerifyInputError`` when the file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise VerifyInputError(f"cannot read checkpoints {path}: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise VerifyInputError(f"checkpoints file {path} is not UTF-8") from None
    if not text.strip():
        return []
    if not text.lstrip().startswith("{"):
        # One signed note; an editor may have added blank lines after it.
        return [CheckpointRecord(text.rstrip() + "\n", None, str(path))]
    records = []
    lines = text.split("\n")[:-1]  # the piece after the last newline: empty or torn
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        where = f"{Path(path).name} line {number}"
        problem = _record_problem(line)
        if problem is not None:
            records.append(CheckpointRecord("", None, where, problem))
            continue
        record = json.loads(line)
        records.append(CheckpointRecord(record["note"], record["size"], where))
    return records


def _record_problem(line: str) -> str | None:
    """Return why a line of ``checkpoints.jsonl`` is not a record, or ``None``."""
    if not line.strip():
        return "a blank line"
    try:
        record = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("note"), str):
        return "no 'note' with the signed note text"
    if not _is_int(record.get("size")):
        return "no integer 'size'"
    return None


# --- entry points ---------------------------------------------------------------------


def verify_path(
    path: Path,
    *,
    keys: Sequence[Path] = (),
    checkpoints: Sequence[Path] = (),
) -> Report:
    """Verify the log, data directory or bundle at ``path``.

    ``keys`` are files of trusted keys (verifier keys or key cards); without them the
    keys found beside the log are used and the report warns that they are not
    pinned. ``checkpoints`` are checkpoints obtained earlier (a note or a
    ``checkpoints.jsonl``), e.g. from upstream; the log must still contain what they
    signed, which detects replacement by an older copy.

    A file named ``*.json``, or whose first line is not a log entry but starts with
    ``{``, is a bundle: a damaged one is reported as ``bundle_malformed``, never read
    as a log. A log file is verified with the checkpoints and keys of its directory
    only when it is that directory's log (``evidence.jsonl`` or ``entries.jsonl``);
    any other log file needs ``checkpoints`` (then its own checkpoints) and ``keys``.

    Raises ``VerifyInputError`` when ``path`` is missing, unreadable or neither a log
    nor a bundle, or a key or checkpoint file cannot be used; everything wrong
    *inside* the evidence is a finding in the report.
    """
    path = Path(path)
    pinned = [v for key_path in keys for v in load_verifiers(key_path)]
    references = [r for ref in checkpoints for r in read_checkpoint_file(ref)]
    if path.is_dir():
        log_path, _ = find_log(path)
        return _verify_log_file(log_path, path, pinned, references)
    if not path.exists():
        raise VerifyInputError(f"{path} does not exist")
    if _is_bundle_file(path):
        return _verify_bundle_file(path, pinned)
    if _is_directory_log(path):
        return _verify_log_file(path, path.parent, pinned, references)
    # A log file on its own: nothing is taken from the directory it happens to be in.
    if not references or not pinned:
        raise VerifyInputError(
            f"{path} is not the log of a data directory, so its checkpoints and key "
            "are not looked up beside it: give them with --checkpoint FILE (its "
            "checkpoints.jsonl) and --key FILE, or verify the data directory"
        )
    return _verify_lone_log(path, pinned, references)


def _is_bundle_file(path: Path) -> bool:
    """Tell a bundle (``*.json``, or a first line that starts an object but is no
    log entry) from a log file; raise ``VerifyInputError`` for neither."""
    if path.suffix in (".json", ".jsonl"):
        return path.suffix == ".json"
    try:
        with path.open("rb") as stream:
            first_line = stream.readline(1 << 20)
    except OSError as exc:
        raise VerifyInputError(f"cannot read {path}: {exc}") from None
    if not first_line.lstrip().startswith(b"{"):
        raise VerifyInputError(
            f"{path} is neither an evidence log nor a bundle from 'ies-agent prove' "
            "(it does not start with '{')"
        )
    try:
        candidate = json.loads(first_line)
    except ValueError:
        return True  # a pretty-printed or damaged bundle
    return not (isinstance(candidate, dict) and "seq" in candidate)


def _is_directory_log(path: Path) -> bool:
    """Tell whether the file ``path`` is the log of the directory it is in."""
    try:
        return find_log(path.parent)[0].samefile(path)
    except (VerifyInputError, OSError):
        return False


def _verify_log_file(
    log_path: Path,
    directory: Path,
    pinned: list[note.NoteVerifier],
    references: list[CheckpointRecord],
) -> Report:
    """Verify the log of ``directory`` with its checkpoints (and, unless keys are
    pinned, its keys)."""
    records = directory_checkpoints(directory)
    missing = missing_checkpoints_file(directory)
    findings: list[Finding] = []
    if pinned:
        verifiers, is_pinned = pinned, True
    else:
        verifiers, source = directory_keys(directory)
        is_pinned = False
        if not verifiers:
            raise VerifyInputError(
                f"no key given and none found beside {log_path}: pass the gateway's "
                "registered key with --key FILE (a .vkey file or key card)"
            )
        findings.append(
            Finding(
                None,
                WARNING,
                "key_not_pinned",
                f"no --key given: trusting the key(s) in {source}, which whoever "
                "could edit the log could also replace; pass the gateway's "
                "registered key with --key to pin it",
            )
        )
    report = _verify_open_log(
        log_path, records, verifiers, references, missing_checkpoints=missing
    )
    report.pinned = is_pinned
    report.findings[:0] = findings
    return report


def _verify_lone_log(
    log_path: Path,
    verifiers: list[note.NoteVerifier],
    records: list[CheckpointRecord],
) -> Report:
    """Verify a log file outside its data directory against the given checkpoints."""
    return _verify_open_log(log_path, records, verifiers, [])


def _verify_open_log(
    log_path: Path,
    records: list[CheckpointRecord],
    verifiers: list[note.NoteVerifier],
    references: list[CheckpointRecord],
    *,
    missing_checkpoints: str | None = None,
) -> Report:
    try:
        with log_path.open("rb") as stream:
            return verify_log(
                stream,
                records,
                verifiers,
                references=references,
                path=str(log_path),
                missing_checkpoints=missing_checkpoints,
            )
    except OSError as exc:
        raise VerifyInputError(f"cannot read {log_path}: {exc}") from None


def find_log(path: Path) -> tuple[Path, Path]:
    """Return (log file, directory with its checkpoints and keys) for ``path``, a
    data directory, a worked-example-like directory or the log file of one.

    Raises ``VerifyInputError`` when there is no log there, or ``path`` is a file
    that is not its directory's log: checkpoints and keys are never taken from
    whatever directory a lone file happens to be in.
    """
    path = Path(path)
    if path.is_dir():
        for name in (LOG_FILE, EXAMPLE_LOG_FILE):
            if (path / name).is_file():
                return path / name, path
        raise VerifyInputError(
            f"{path} holds no evidence log ({LOG_FILE} or {EXAMPLE_LOG_FILE})"
        )
    if path.is_file():
        if _is_directory_log(path):
            return path, path.parent
        raise VerifyInputError(
            f"{path} is not the log of a data directory ({LOG_FILE} or "
            f"{EXAMPLE_LOG_FILE}), so there are no checkpoints or keys beside it to "
            "use: pass the data directory"
        )
    raise VerifyInputError(f"{path} does not exist")


def directory_checkpoints(directory: Path) -> list[CheckpointRecord]:
    """Return the checkpoints kept in ``directory``: ``checkpoints.jsonl``, else the
    ``*.note`` files (in name order)."""
    if (directory / CHECKPOINTS_FILE).exists():
        return read_checkpoint_file(directory / CHECKPOINTS_FILE)
    records = []
    for note_path in sorted(directory.glob("*.note")):
        records.extend(read_checkpoint_file(note_path))
    return records


def missing_checkpoints_file(directory: Path) -> str | None:
    """Return the path of ``checkpoints.jsonl`` when ``directory`` keeps no
    checkpoints at all (neither that file nor ``*.note`` files), else ``None``."""
    if (directory / CHECKPOINTS_FILE).exists() or any(directory.glob("*.note")):
        return None
    return str(directory / CHECKPOINTS_FILE)


def directory_keys(directory: Path) -> tuple[list[note.NoteVerifier], str]:
    """Return the keys found in ``directory`` and where they came from."""
    card = directory / KEY_CARD
    if card.exists():
        return load_verifiers(card), str(card)
    vkey_files = sorted(directory.glob("*.vkey")) or sorted(
        (directory / "keys").glob("*.vkey")
    )
    verifiers = [v for path in vkey_files for v in load_verifiers(path)]
    return verifiers, ", ".join(str(p) for p in vkey_files)


# --- bundles --------------------------------------------------------------------------


def _verify_bundle_file(path: Path, pinned: list[note.NoteVerifier]) -> Report:
    """Verify the bundle file ``path``.

    A file that cannot be read at all raises ``VerifyInputError`` (exit 2). A file
    that is read but holds no valid bundle (empty, cut short, not JSON, a field
    missing) is damaged evidence: the report fails with one ``bundle_malformed``
    finding ("not a valid proof bundle: ...", exit 1), whatever keys were given.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VerifyInputError(f"cannot read {path}: {exc}") from None
    bundle, problem = _load_bundle(data)
    if bundle is None or problem is not None:
        report = Report(path=str(path), kind="bundle", pinned=bool(pinned))
        report.trusted_keys = [v.label for v in pinned]
        report.findings.append(
            Finding(
                None,
                ERROR,
                "bundle_malformed",
                f"not a valid proof bundle: {problem}",
            )
        )
        return report
    findings: list[Finding] = []
    verifiers = list(pinned)
    if not verifiers:
        hints = bundle.get("keys")
        if isinstance(hints, list):
            for hint in hints:
                vkey = hint.get("vkey") if isinstance(hint, dict) else hint
                if isinstance(vkey, str):
                    try:
                        verifiers.append(note.parse_vkey(vkey))
                    except NoteError:
                        continue
        if not verifiers:
            raise VerifyInputError(
                f"bundle {path} names no key: pass the gateway's registered key with "
                "--key FILE"
            )
        findings.append(
            Finding(
                None,
                WARNING,
                "key_not_pinned",
                "no --key given: trusting the keys the bundle itself names; pass the "
                "gateway's registered key with --key to pin it",
            )
        )
    report = verify_bundle(bundle, verifiers, path=str(path))
    report.pinned = bool(pinned)
    report.findings[:0] = findings
    return report


def _load_bundle(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a bundle file's bytes; return (bundle, problem), one of them ``None``
    unless the JSON object parsed but lacks what a bundle needs."""
    if not data.strip():
        return None, "the file is empty"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "the file is not UTF-8 text"
    try:
        bundle = json.loads(text)
    except json.JSONDecodeError as exc:
        ended = exc.pos >= len(text.rstrip())
        return None, (
            f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            + (" (the file ends early: cut short?)" if ended else "")
        )
    except RecursionError:
        return None, "nested too deeply"
    if not isinstance(bundle, dict):
        return None, f"a JSON {type(bundle).__name__}, not an object"
    return bundle, _bundle_problem(bundle)


_BUNDLE_FIELDS = (
    ("entry", str, "the disclosed entry line, as text"),
    ("leaf_index", int, "the entry's seq, an integer"),
    ("tree_size", int, "the size of the signed tree, an integer"),
    ("proof", list, "the inclusion proof, a list of base64 hashes"),
    ("checkpoint", str, "the signed checkpoint note, as text"),
)


def _bundle_problem(bundle: Mapping[str, Any]) -> str | None:
    """Return the first field a bundle lacks or holds in the wrong type, or ``None``."""
    for name, kind, what in _BUNDLE_FIELDS:
        if name not in bundle:
            return f"no '{name}' ({what})"
        value = bundle[name]
        if (kind is int and not _is_int(value)) or not isinstance(value, kind):
            return f"'{name}' must be {what}; it is a {type(value).__name__}"
    return None


def verify_bundle(
    bundle: Mapping[str, Any],
    verifiers: Sequence[note.NoteVerifier],
    *,
    path: str = "<bundle>",
) -> Report:
    """Verify a disclosure bundle: one entry, its inclusion proof and the signed
    checkpoint whose tree holds it.

    Never raises for bad evidence: everything is a finding in the returned report.
    """
    report = Report(path=path, kind="bundle", entries=1, checkpoints=1)
    report.trusted_keys = [v.label for v in verifiers]
    findings = report.findings
    index = bundle.get("leaf_index")
    seq = index if _is_int(index) else None

    def fail(code: str, message: str) -> Report:
        findings.append(Finding(seq, ERROR, code, message))
        return report

    entry_text = bundle.get("entry")
    size = bundle.get("tree_size")
    raw_proof = bundle.get("proof")
    note_text = bundle.get("checkpoint")
    problem = _bundle_problem(bundle)
    if problem is not None or not (
        isinstance(entry_text, str)
        and _is_int(index)
        and _is_int(size)
        and isinstance(raw_proof, list)
        and isinstance(note_text, str)
    ):
        return fail("bundle_malformed", f"not a valid proof bundle: {problem}")
    try:
        opened = note.open_note(note_text, verifiers)
        checkpoint = note.parse_checkpoint(opened.text)
    except NoteError as exc:
        return fail("checkpoint_signature", f"bundle checkpoint: {exc}")
    if not opened.verified_by:
        return fail(
            "checkpoint_untrusted",
            f"bundle checkpoint is not signed by a trusted key ({opened.unknown_sigs} "
            "signature(s) by other keys)",
        )
    report.signed_size = checkpoint.size
    if checkpoint.size != size:
        return fail(
            "checkpoint_size_mismatch",
            f"bundle says tree_size {size}, its checkpoint signs {checkpoint.size}",
        )
    raw = entry_text.encode("utf-8")
    try:
        entry = parse_entry(raw)
    except EvidenceFormatError as exc:
        return fail("bad_line", f"disclosed entry: {exc}")
    if entry.get("seq") != index:
        return fail(
            "seq_mismatch",
            f"disclosed entry says seq {entry.get('seq')!r}, the proof is for leaf "
            f"{index}",
        )
    problem = _shape_problem(entry, parse_time_ms(entry.get("t")))
    if problem is not None:
        return fail("bad_entry", f"disclosed entry is not valid: {problem}")
    try:
        proof = [
            merkle.decode_hash(item, f"proof[{n}]") for n, item in enumerate(raw_proof)
        ]
        included = merkle.verify_inclusion(
            merkle.leaf_hash(raw), index, size, proof, checkpoint.root
        )
    except ProofError as exc:
        return fail("proof", f"inclusion proof: {exc}")
    if not included:
        return fail(
            "proof",
            f"the entry is not leaf {index} of the signed tree of {size} entries: the "
            "entry or its proof was altered",
        )
    return report


# --- the log --------------------------------------------------------------------------


def verify_log(
    data: bytes | Iterable[bytes],
    checkpoints: Sequence[CheckpointRecord],
    verifiers: Sequence[note.NoteVerifier],
    *,
    references: Sequence[CheckpointRecord] = (),
    path: str = "<log>",
    missing_checkpoints: str | None = None,
) -> Report:
    """Verify a log against ``checkpoints`` signed by ``verifiers``.

    ``data`` is the log's bytes, or its lines with their newlines (an open binary
    file works: the log is read once, front to back, and about 50 bytes per entry
    are kept, so a log larger than memory verifies too). ``references`` are
    checkpoints obtained earlier from elsewhere (rollback check).
    ``missing_checkpoints`` names the checkpoints file when it does not exist at
    all (see :func:`missing_checkpoints_file`): a log with ``checkpoint`` events
    then fails with one finding instead of one per event. Never raises for bad
    evidence: everything is a finding in the returned report.
    """
    if isinstance(data, bytes):
        # Split at b"\n" only: a stray b"\r" inside an altered entry stays in it.
        pieces = data.split(b"\n")
        lines: Iterable[bytes] = [piece + b"\n" for piece in pieces[:-1]]
        if pieces[-1]:
            lines = [*lines, pieces[-1]]
    else:
        lines = data
    # A run builds short-lived dicts and no reference cycles; the cyclic collector
    # would only scan them again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        check = _LogCheck(checkpoints, verifiers, references, path)
        check.missing_file = missing_checkpoints
        return check.run(lines)
    finally:
        if collecting:
            gc.enable()


def _b64_sha256(raw: bytes) -> str:
    return base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii")


def _not_an_entry(raw: bytes) -> tuple[str | None, int]:
    """Look closer at a line that is not a canonical entry.

    Returns (what it is, ``_NONE``) for a line that is no entry at all (blank, not
    JSON and nothing like an entry, JSON but no object), else (``None``, the ``seq``
    it declares or ``_NONE``): an altered entry, which may still say where it
    belongs.
    """
    if not raw.strip():
        return "a blank line", _NONE
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        # A flipped byte breaks the JSON of an entry, not its "seq" field.
        found = _SEQ_FIELD.findall(raw)
        if raw.startswith(b"{") and len(found) == 1:
            return None, int(found[0])
        return "not JSON", _NONE
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object", _NONE
    seq = value.get("seq")
    return None, seq if type(seq) is int and seq >= 0 else _NONE


_SEQ_FIELD = re.compile(rb'"seq":([0-9]{1,15})[,}]')

_Pending = tuple[bytes, bytes, dict[str, Any] | None, int, str | None, str | None]
"""A line waiting for its successor: raw, leaf, entry, declared seq, parse error,
what it is when no entry at all."""


_NONE = -1
"""Stands for "no value" in the per-line integer arrays."""
_END = -2
"""Stands for the seq of the line after the last."""
_MAX_JUMP = 1_000_000
"""A ``seq`` further ahead than this is an altered field, not a gap."""


class _LogCheck:
    """One verification run over a log, in one pass plus a resolution at the end.

    Per stored line only a few numbers are kept (its reported ``seq``, leaf hash,
    time), never the entry itself.
    """

    def __init__(
        self,
        checkpoints: Sequence[CheckpointRecord],
        verifiers: Sequence[note.NoteVerifier],
        references: Sequence[CheckpointRecord],
        path: str,
    ) -> None:
        self.records = list(checkpoints)
        self.references = list(references)
        self.trusted = list(verifiers)
        self.report = Report(path=path, kind="log")
        self.findings: list[Finding] = []
        self._reported: set[tuple[int | None, str]] = set()
        self.blamed: dict[int, int] = {}
        """Stored line position -> seq named by an error about that line."""
        self.count = 0
        """Complete lines read."""
        self.labels = array("q")
        """Position -> the seq the line is reported as."""
        self.leaves = bytearray()
        """Leaf hashes, 32 bytes per position."""
        self.times = array("q")
        """Position -> gateway time (UTC ms) or ``_NONE``."""
        self.structural = bytearray()
        """Position -> 1 when misplaced (gap before it, duplicate, out of order,
        relabelled)."""
        self.seen = bytearray()
        """seq -> 1 once a line is reported as that seq."""
        self.no_prev = array("q")
        """Positions (> 0) of entries without ``prev``."""
        self.gaps: list[tuple[int, int, int]] = []
        """(position, expected seq, declared seq) where the log jumps ahead."""
        self.breaks: list[int] = []
        """Positions p where line p-1 does not hash to line p's ``prev``."""
        self.rotations: list[tuple[int, str, str]] = []
        """(position, old vkey, new vkey) of every ``key_rotation`` event."""
        self.roots: dict[int, bytes] = {}
        self.missing_file: str | None = None
        """The checkpoints file, when it does not exist at all."""
        self.noted: set[int] = set()
        """Sizes named by the checkpoint records (declared or signed)."""
        self.checkpoint_events: list[tuple[int, int]] = []
        """(position, seq) of every ``checkpoint`` event in its place."""
        self.unclean_after: set[int] = set()
        """Positions of ``checkpoint`` events directly followed by a ``boot`` that
        says the agent stopped uncleanly."""
        self.last_entry_pos = -1
        """Position of the last line that is an entry (not an inserted line)."""
        self.inserted: list[tuple[int, str]] = []
        """(position, what it is) of lines that are no entry, between entries."""
        self.untrusted: list[tuple[int, CheckpointRecord, note.Checkpoint, int]] = []
        """(index, record, body, signatures by other keys) of checkpoints no
        trusted key signed."""
        self._checkpoint_pos = _NONE
        """Position of the entry before, when it is a ``checkpoint`` event."""
        self._torn = b""
        self._last_link_broken = False
        self._prev_hash = ""
        """base64 SHA-256 of the line before the one being read."""
        self._prev_ok = False
        """Whether that line parsed and sits where it belongs."""

    def add(
        self,
        seq: int | None,
        severity: str,
        code: str,
        message: str,
        *,
        pos: int | None = None,
    ) -> None:
        """Record a finding once per (seq, code); ``pos`` is the stored line it
        blames, remembered so a failing checkpoint can name it."""
        if pos is not None and severity == ERROR and seq is not None:
            self.blamed.setdefault(pos, seq)
        if (seq, code) in self._reported:
            return
        self._reported.add((seq, code))
        self.findings.append(Finding(seq, severity, code, message))

    def run(self, lines: Iterable[bytes]) -> Report:
        self._stream(lines, self._wanted_sizes())
        self._resolve_gaps()
        self._resolve_chain()
        self._check_checkpoints()
        report = self.report
        report.entries = self.count - len(self.inserted)
        report.checkpoints = sum(1 for record in self.records if record.note)
        report.trusted_keys = [v.label for v in self.trusted]
        report.findings = sorted(
            self.findings,
            key=lambda f: (f.seq is not None, f.seq or 0, f.severity != ERROR),
        )
        return report

    def _wanted_sizes(self) -> set[int]:
        """Sizes named by any checkpoint body (signatures are checked later); the
        sizes the log's own records name are kept in ``noted``."""
        sizes = set()
        noted = {r.declared_size for r in self.records if r.declared_size is not None}
        own = len(self.records)
        for index, record in enumerate((*self.records, *self.references)):
            try:
                text, _ = note.split_note(record.note)
                size = note.parse_checkpoint(text).size
            except NoteError:
                continue
            sizes.add(size)
            if index < own:
                noted.add(size)
        self.noted = noted
        return sizes

    # --- the pass ---------------------------------------------------------------------

    def _stream(self, lines: Iterable[bytes], sizes: set[int]) -> None:
        """Read every line once: parse, hash, place, chain, check its contents.

        A line is handled when the next one has been parsed, because where it
        belongs can depend on the ``seq`` of its successor.
        """
        entries = _EntryCheck(self)
        frontier = merkle.MerkleFrontier()
        if 0 in sizes:
            self.roots[0] = frontier.root()
        pending: _Pending | None = None
        for raw in lines:
            if not raw.endswith(b"\n"):
                self._torn = raw  # only the last piece can lack its newline
                break
            raw = raw[:-1]
            junk: str | None = None
            try:
                entry: dict[str, Any] | None = parse_entry(raw)
                error = None
            except EvidenceFormatError as exc:
                entry, error = None, str(exc)
                junk, declared = _not_an_entry(raw)
            if entry is not None:
                seq = entry.get("seq")
                declared = seq if type(seq) is int and seq >= 0 else _NONE
            if pending is not None:
                self._line(*pending, declared, entries)
            # Hash as we go, recording the root wherever a checkpoint needs one.
            leaf = merkle.leaf_hash(raw)
            frontier.append(leaf)
            if frontier.size in sizes:
                self.roots[frontier.size] = frontier.root()
            pending = (raw, leaf, entry, declared, error, junk)
        if pending is not None:
            self._line(*pending, _END, entries)
        entries.finish(self.count)
        self._report_inserted()
        if self._torn:
            self.add(
                len(self.seen),
                WARNING,
                "torn_tail",
                f"the log ends in an incomplete line ({len(self._torn)} bytes without "
                "a newline): a write was cut off; the agent cuts it at its next start",
            )

    def _line(
        self,
        raw: bytes,
        leaf: bytes,
        entry: dict[str, Any] | None,
        declared: int,
        error: str | None,
        junk: str | None,
        next_declared: int,
        entries: _EntryCheck,
    ) -> None:
        pos = self.count
        self.count += 1
        expected = len(self.seen)
        # The last line replaced an entry when a checkpoint counts an entry there.
        replaced = next_declared == expected + 1 or (
            next_declared == _END and pos < max(self.noted, default=0)
        )
        if junk is not None and not replaced:
            # No entry, and no entry is missing here (the next line is the one
            # expected, or the log ends): the line was inserted.
            self.leaves += leaf
            self.labels.append(max(expected - 1, 0))
            self.structural.append(1)
            self.times.append(_NONE)
            self.inserted.append((pos, junk))
            return  # the next entry's 'prev' is checked against the entry before
        label, structural = self._place(pos, leaf, declared, next_declared)
        self.leaves += leaf
        self.labels.append(label)
        self.structural.append(structural)
        self.last_entry_pos = pos
        if junk is not None:
            self.add(
                label,
                ERROR,
                "bad_line",
                f"line {pos + 1} is not an entry ({junk}) where entry seq {label} "
                "belongs: the entry was overwritten",
                pos=pos,
            )
        elif error is not None:
            self.add(label, ERROR, "bad_line", f"{error}: it was altered", pos=pos)
        if entry is not None:
            self._link(pos, entry, structural)
            self._note_event(pos, label, entry, structural)
        else:
            self._checkpoint_pos = _NONE
        self._prev_hash = _b64_sha256(raw)
        self._prev_ok = entry is not None and not structural
        self.times.append(entries.line(pos, label, entry, structural))

    def _note_event(
        self, pos: int, seq: int, entry: Mapping[str, Any], structural: int
    ) -> None:
        """Remember key rotations, checkpoint events and the boots after them."""
        ev = entry.get("ev") if entry.get("type") == "event" else None
        if ev == "key_rotation":
            old, new = entry.get("old_vkey"), entry.get("new_vkey")
            if isinstance(old, str) and isinstance(new, str):
                self.rotations.append((pos, old, new))
        elif (
            ev == "boot"
            and self._checkpoint_pos != _NONE
            and entry.get("prev_shutdown") == "unclean"
        ):
            self.unclean_after.add(self._checkpoint_pos)
        if ev == "checkpoint" and not structural:
            self.checkpoint_events.append((pos, seq))
            self._checkpoint_pos = pos
        else:
            self._checkpoint_pos = _NONE

    def _report_inserted(self) -> None:
        """Report lines that are no entry, one finding per run of adjacent lines."""
        runs: list[list[tuple[int, str]]] = []
        for pos, what in self.inserted:
            if runs and runs[-1][-1][0] == pos - 1:
                runs[-1].append((pos, what))
            else:
                runs.append([(pos, what)])
        for run in runs:
            first, last = run[0][0], run[-1][0]
            kinds = ", ".join(sorted({what for _, what in run}))
            lines = f"line {first + 1}"
            if last > first:
                lines = f"lines {first + 1}..{last + 1}"
            # The line before a run is an entry (runs are maximal).
            where = f"after seq {self.labels[first - 1]}" if first else "before seq 0"
            if last == self.count - 1:
                where = f"at the end of the log, {where}"
            self.findings.append(
                Finding(
                    None,
                    ERROR,
                    "not_an_entry",
                    f"{lines} ({where}): not an entry ({kinds}): "
                    f"{'it was' if first == last else 'they were'} added to the log",
                )
            )

    def _place(
        self, pos: int, leaf: bytes, declared: int, next_declared: int
    ) -> tuple[int, int]:
        """Return (label, structural) of the line at ``pos``, reporting misplacement."""
        seen = self.seen
        expected = len(seen)  # one more than the highest seq reported so far
        if declared in (_NONE, expected):
            seen.append(1)
            return expected, 0
        if next_declared == expected + 1 or declared > expected + _MAX_JUMP:
            # The neighbours agree this is entry `expected`: its seq field changed.
            seen.append(1)
            self.add(
                expected,
                ERROR,
                "seq_mismatch",
                f"entry stored as seq {expected} (between its neighbours) says "
                f"seq {declared}: it was altered",
                pos=pos,
            )
            return expected, 1
        if declared > expected:
            # Entries expected..declared-1 come later (reordered) or never
            # (deleted): decided once the whole log is read.
            self.gaps.append((pos, expected, declared))
            seen.extend(bytes(declared - expected))
            seen.append(1)
            return declared, 1
        if seen[declared]:
            labels = self.labels
            # Usually nothing before it moved and seq N is line N.
            usual = declared < len(labels) and labels[declared] == declared
            first = declared if usual else labels.index(declared)
            same = self.leaves[32 * first : 32 * first + 32] == leaf
            self.add(
                declared,
                ERROR,
                "duplicate",
                f"entry seq {declared} is stored twice (lines {first + 1} and "
                f"{pos + 1}){'' if same else ' with different content'}",
                pos=pos,
            )
            return declared, 1
        seen[declared] = 1
        self.add(
            declared,
            ERROR,
            "out_of_order",
            f"entry seq {declared} is stored after seq {expected - 1} (line "
            f"{pos + 1}): entries were reordered",
            pos=pos,
        )
        return declared, 1

    def _link(self, pos: int, entry: Mapping[str, Any], structural: int) -> None:
        """Check this entry's ``prev`` against the line before it."""
        if pos == 0:
            return
        prev = entry.get("prev")
        if prev is None:
            self.no_prev.append(pos)
            if len(self.no_prev) < pos and not structural:
                self.add(
                    self.labels[pos],
                    WARNING,
                    "no_prev",
                    "entry has no 'prev' although earlier entries do",
                )
            return
        if prev != self._prev_hash and not structural and self._prev_ok:
            self.breaks.append(pos)

    # --- after the pass ---------------------------------------------------------------

    def _resolve_gaps(self) -> None:
        """Tell deleted entries from reordered ones, now that every seq is known."""
        seen = self.seen
        for pos, expected, declared in self.gaps:
            missing = [s for s in range(expected, declared) if not seen[s]]
            if missing:
                self._report_missing(missing, declared, pos)
            else:
                self.add(
                    declared,
                    ERROR,
                    "out_of_order",
                    f"entry seq {declared} is stored before seq {expected} "
                    f"(line {pos + 1}): entries were reordered",
                    pos=pos,
                )

    def _report_missing(self, missing: list[int], before: int, pos: int) -> None:
        for start, end in _runs(missing):
            what = _seq_range(start, end)
            self.add(
                start,
                ERROR,
                "missing",
                f"{what} missing (the log jumps to seq {before}): deleted",
                pos=pos,
            )

    def _resolve_chain(self) -> None:
        """Name the altered entry at each broken ``prev`` link."""
        breaks = self.breaks
        broken = set(breaks)
        for pos in breaks:
            if pos - 1 in broken:
                continue  # consumed by the double break below
            if pos + 1 in broken:
                self.add(
                    self.labels[pos],
                    ERROR,
                    "altered",
                    "entry was altered: its 'prev' does not match the entry before it "
                    "and its hash does not match the 'prev' of the entry after it",
                    pos=pos,
                )
            elif pos == self.count - 1:
                # The last link: the entry before, or the last entry's own 'prev',
                # was changed; a checkpoint may tell which (see _check_checkpoints).
                self._last_link_broken = True
            else:
                self._blame_before_link(pos)

    def _blame_before_link(self, pos: int) -> None:
        """Name the entry before ``pos`` as altered: its hash no longer matches."""
        labels = self.labels
        self.add(
            labels[pos - 1],
            ERROR,
            "altered",
            f"entry was altered: its SHA-256 does not match the 'prev' of the next "
            f"entry (seq {labels[pos]})",
            pos=pos - 1,
        )

    def _resolve_last_link(self, good_sizes: Sequence[int]) -> None:
        """Blame the last link's break on one side when a checkpoint vouches for the
        other, else on both."""
        labels = self.labels
        last = self.count - 1
        if max(good_sizes, default=0) >= last:
            # The entry before the last is signed intact: the last one changed.
            self.add(
                labels[last],
                ERROR,
                "altered",
                "entry was altered: its 'prev' does not match the entry before it, "
                "which a checkpoint signed intact",
                pos=last,
            )
            return
        self._blame_before_link(last)
        self.add(
            labels[last],
            ERROR,
            "altered",
            f"the 'prev' of this last entry does not match seq {labels[last - 1]}:"
            " one of the two was altered (no checkpoint tells which)",
            pos=last,
        )

    def _check_checkpoints(self) -> None:
        count = self.count
        rotations = self.rotations
        opened: list[tuple[CheckpointRecord, note.Checkpoint | None]] = []
        for record in self.records:
            opened.append((record, self._open(record, rotations, opened)))
        self._vouch_retired_keys(opened)
        self._report_untrusted()
        origin: str | None = None
        for record, checkpoint in opened:
            if checkpoint is None:
                continue
            if origin is None:
                origin = checkpoint.origin
            elif checkpoint.origin != origin:
                self.add(
                    checkpoint.size - 1 if checkpoint.size else None,
                    ERROR,
                    "checkpoint_origin",
                    f"{record.where}: checkpoint names log {checkpoint.origin!r}, "
                    f"earlier ones {origin!r}",
                )

        references: list[tuple[CheckpointRecord, note.Checkpoint]] = []
        for record in self.references:
            checkpoint = self._open_reference(record)
            if checkpoint is not None:
                references.append((record, checkpoint))

        roots = self.roots

        # Sizes never shrink; each root matches the lines.
        largest = 0
        signed = 0
        first_bad: int | None = None
        later_bad = 0
        good_sizes = [0]
        for record, checkpoint in opened:
            if checkpoint is None:
                continue
            size = checkpoint.size
            seq = size - 1 if size else None
            if size < largest:
                self.add(
                    seq,
                    ERROR,
                    "checkpoint_shrinks",
                    f"{record.where}: checkpoint of {size} entries follows one of "
                    f"{largest}: the log went back",
                )
            largest = max(largest, size)
            if size > count:
                self.add(
                    count,
                    ERROR,
                    "checkpoint_beyond_log",
                    f"{record.where}: checkpoint signs {size} entries but the log "
                    f"holds {count}: "
                    + (
                        "entries were removed (see above)"
                        if self.blamed
                        else f"{_seq_range(count, size - 1)} gone (the log was "
                        "cut short or replaced by an older copy)"
                    ),
                )
                continue
            if roots[size] == checkpoint.root:
                signed = max(signed, size)
                good_sizes.append(size)
                continue
            if first_bad is None or size < first_bad:
                if first_bad is not None:
                    later_bad += 1
                first_bad = size
            else:
                later_bad += 1
        if self._last_link_broken:
            self._resolve_last_link(good_sizes)
        if first_bad is not None:
            low = max((s for s in good_sizes if s < first_bad), default=0)
            self._report_bad_root(low, first_bad, later_bad)
        self.report.signed_size = signed

        for record, checkpoint in references:
            self._check_reference(record, checkpoint, roots, largest)

        if self._check_notes_present():
            return
        top = len(self.seen) - 1  # the highest seq in the log
        if not self.records:
            if count:
                self.add(
                    None,
                    WARNING,
                    "no_checkpoint",
                    f"no checkpoint found: none of the {count} entries is "
                    "protected by a signature",
                )
        elif largest <= top:
            # By seq, not by line: a duplicated or inserted line adds no entry.
            what = "a trusted checkpoint" if self.untrusted else "a checkpoint yet"
            after = f" ({top - largest + 1} after the last one)" if largest else ""
            self.add(
                largest,
                WARNING,
                "unprotected",
                f"{_seq_range(largest, top)} not covered by {what}{after}: not yet "
                "protected by a signature",
            )

    def _check_notes_present(self) -> bool:
        """Check that every ``checkpoint`` event has its signed note (size seq + 1).

        The agent appends the event, then signs and stores the note: a crash in
        between leaves the last checkpoint event of that run without a note. That
        event is the last entry of the log, or the next entry is a ``boot`` saying
        the agent stopped uncleanly; such a note is a warning, any other missing note
        an error. Returns True when the whole checkpoints file is missing (one error
        says so; nothing else about coverage is worth saying then).
        """
        events = self.checkpoint_events
        if not events:
            return False
        if self.missing_file is not None and not self.records:
            self.add(
                None,
                ERROR,
                "checkpoints_missing",
                f"{self.missing_file} does not exist, but the log holds "
                f"{len(events)} checkpoint event(s) (the first at seq {events[0][1]}) "
                "whose signed notes it kept: it was deleted or not copied, so no "
                "entry can be checked against a signature",
            )
            return True
        missing = []
        for pos, seq in events:
            if seq + 1 in self.noted:
                continue
            if pos in self.unclean_after or pos == self.last_entry_pos:
                after = (
                    "the next boot reports an unclean shutdown"
                    if pos in self.unclean_after
                    else "it is the last entry of the log"
                )
                self.add(
                    seq,
                    WARNING,
                    "checkpoint_unsigned",
                    f"checkpoint event has no signed note: the agent stopped between "
                    f"logging and signing it ({after}); its entries are left to the "
                    "next checkpoint",
                )
            else:
                missing.append(seq)
        for seq in missing[:_LISTED]:
            self.add(
                seq,
                ERROR,
                "checkpoint_note_missing",
                f"checkpoint event at seq {seq} has no signed note: "
                f"{CHECKPOINTS_FILE} was edited, cut or deleted",
            )
        rest = missing[_LISTED:]
        if rest:
            self.add(
                rest[0],
                ERROR,
                "checkpoint_note_missing",
                f"{len(rest)} more checkpoint events (seq {rest[0]}..{rest[-1]}) have "
                f"no signed note either: {CHECKPOINTS_FILE} was edited, cut or deleted",
            )
        return False

    def _open(
        self,
        record: CheckpointRecord,
        rotations: list[tuple[int, str, str]],
        opened: list[tuple[CheckpointRecord, note.Checkpoint | None]],
    ) -> note.Checkpoint | None:
        """Check one checkpoint's signatures and body; trust keys handed over.

        A checkpoint no trusted key signed is set aside in ``untrusted`` (reported
        together, see ``_report_untrusted``).
        """
        seq = record.declared_size - 1 if record.declared_size else None
        if not record.note:
            # One finding per line (all have no seq: not deduplicated).
            self.findings.append(
                Finding(
                    None,
                    ERROR,
                    "checkpoint_malformed",
                    f"{record.where}: not a checkpoint record ({record.problem}); "
                    "each line must be a JSON object with 'note' (the signed note) "
                    "and 'size'",
                )
            )
            return None
        self._trust_handovers(rotations, opened)
        try:
            result = note.open_note(record.note, self.trusted)
            checkpoint = note.parse_checkpoint(result.text)
        except NoteError as exc:
            self.add(seq, ERROR, "checkpoint_signature", f"{record.where}: {exc}")
            return None
        if not result.verified_by:
            self.untrusted.append(
                (len(opened), record, checkpoint, result.unknown_sigs)
            )
            return None
        self._check_declared_size(record, checkpoint)
        return checkpoint

    def _check_declared_size(
        self, record: CheckpointRecord, checkpoint: note.Checkpoint
    ) -> None:
        if record.declared_size is not None and record.declared_size != checkpoint.size:
            self.add(
                checkpoint.size - 1 if checkpoint.size else None,
                ERROR,
                "checkpoint_size_mismatch",
                f"{record.where}: record says size {record.declared_size}, the signed "
                f"checkpoint says {checkpoint.size}",
            )

    def _trust_handovers(
        self,
        rotations: list[tuple[int, str, str]],
        opened: list[tuple[CheckpointRecord, note.Checkpoint | None]],
    ) -> None:
        """Trust the new key of a rotation once a valid checkpoint by a trusted key
        covers the ``key_rotation`` event that names a trusted old key."""
        if not rotations or not opened:
            return
        covered = max((c.size for _, c in opened if c is not None), default=0)
        labels = {v.vkey for v in self.trusted}
        for pos, old, new in rotations:
            if pos < covered and old in labels and new not in labels:
                try:
                    self.trusted.append(note.parse_vkey(new))
                except NoteError:
                    continue
                labels.add(new)

    def _vouch_retired_keys(
        self, opened: list[tuple[CheckpointRecord, note.Checkpoint | None]]
    ) -> None:
        """Check checkpoints signed by a key the user did not give but a given key
        vouched for: the old key of a rotation whose ``key_rotation`` event (naming
        a trusted new key) a trusted checkpoint covers.

        The old key is used only for checkpoints up to the first trusted one over
        the rotation (the hand-over, which both keys sign): a retired key may have
        been retired because it leaked, so it proves nothing signed after that.
        Reports one warning per key so used.
        """
        known = {v.vkey for v in self.trusted}
        changed = True
        while changed and self.untrusted:
            changed = False
            for pos, old, new in self.rotations:
                if old in known or new not in known:
                    continue
                covering = [c.size for _, c in opened if c is not None and c.size > pos]
                if not covering:
                    continue
                try:
                    verifier = note.parse_vkey(old)
                except NoteError:
                    continue
                known.add(old)
                changed = True
                limit = min(covering)
                sizes = self._open_with(verifier, limit, opened)
                if sizes:
                    self.add(
                        self.labels[pos],
                        WARNING,
                        "key_vouched",
                        f"{_count(len(sizes), 'checkpoint')} (sizes {sizes[0]}.."
                        f"{sizes[-1]}) are signed by {verifier.label}, a key not "
                        "given: the key before this key_rotation event, which a "
                        f"given key signed over (checkpoint of {limit} entries). To "
                        "pin it as well, pass the key card (keys/key-card.json), "
                        "which lists retired keys",
                    )

    def _open_with(
        self,
        verifier: note.NoteVerifier,
        limit: int,
        opened: list[tuple[CheckpointRecord, note.Checkpoint | None]],
    ) -> list[int]:
        """Open the untrusted checkpoints of at most ``limit`` entries again, now
        trusting ``verifier`` too; return the sizes it verified."""
        verified = []
        remaining = []
        for item in self.untrusted:
            index, record, checkpoint, _ = item
            if checkpoint.size > limit:
                remaining.append(item)
                continue
            try:
                result = note.open_note(record.note, [*self.trusted, verifier])
            except NoteError as exc:
                seq = checkpoint.size - 1 if checkpoint.size else None
                self.add(seq, ERROR, "checkpoint_signature", f"{record.where}: {exc}")
                continue
            if not result.verified_by:
                remaining.append(item)
                continue
            self._check_declared_size(record, checkpoint)
            opened[index] = (record, checkpoint)
            verified.append(checkpoint.size)
        self.untrusted = remaining
        return sorted(verified)

    def _report_untrusted(self) -> None:
        """Report the checkpoints no trusted key signed, in one finding."""
        if not self.untrusted:
            return
        items = self.untrusted
        first, last = items[0], items[-1]
        others = sum(unknown for *_, unknown in items)
        if len(items) == 1:
            what = (
                f"{first[1].where}: checkpoint of {first[2].size} entries is not "
                "signed by a trusted key"
            )
        else:
            sizes = sorted(checkpoint.size for _, _, checkpoint, _ in items)
            what = (
                f"{len(items)} checkpoints ({_where_range(first[1], last[1])}, "
                f"sizes {sizes[0]}..{sizes[-1]}) are not signed by a trusted key"
            )
        hint = (
            "; if the gateway's key was rotated, pass its key card "
            "(keys/key-card.json), which lists retired keys, or the earlier key "
            "with another --key"
        )
        for pos, old, _ in self.rotations:
            try:
                label = note.parse_vkey(old).label
            except NoteError:
                continue
            hint += (
                f" (the key_rotation event at seq {self.labels[pos]} names the "
                f"earlier key {label})"
            )
            break
        self.add(
            first[2].size - 1 if first[2].size else None,
            ERROR,
            "checkpoint_untrusted",
            f"{what} ({_count(others, 'signature')} by keys not given){hint}",
        )

    def _open_reference(self, record: CheckpointRecord) -> note.Checkpoint | None:
        try:
            result = note.open_note(record.note, self.trusted)
            checkpoint = note.parse_checkpoint(result.text)
        except NoteError as exc:
            self.add(
                None,
                ERROR,
                "reference_signature",
                f"reference checkpoint {record.where}: {exc}",
            )
            return None
        if not result.verified_by:
            self.add(
                None,
                WARNING,
                "reference_untrusted",
                f"reference checkpoint {record.where} is not signed by a trusted key; "
                "ignored",
            )
            return None
        return checkpoint

    def _check_reference(
        self,
        record: CheckpointRecord,
        checkpoint: note.Checkpoint,
        roots: Mapping[int, bytes],
        largest: int,
    ) -> None:
        size, count = checkpoint.size, self.count
        if size > count:
            local = (
                f"; the local checkpoints reach only {largest} entries"
                if largest < size
                else ""
            )
            self.add(
                count,
                ERROR,
                "rollback",
                f"a checkpoint obtained earlier ({record.where}) signs {size} entries "
                f"but the log holds {count}: it was replaced by an older copy or cut "
                f"short{local}",
            )
        elif roots[size] != checkpoint.root:
            self.add(
                size - 1 if size else None,
                ERROR,
                "fork",
                f"the first {size} entries differ from what a checkpoint obtained "
                f"earlier ({record.where}) signed: the log was rewritten",
            )

    def _report_bad_root(self, low: int, size: int, later_bad: int) -> None:
        later = (
            f"; {later_bad} later checkpoint(s) fail for the same reason"
            if later_bad
            else ""
        )
        named = sorted({seq for pos, seq in self.blamed.items() if low <= pos < size})
        added = [pos + 1 for pos, _ in self.inserted if low <= pos < size]
        seq = last = self.labels[size - 1]
        if named or added:
            seq = named[0] if named else self.labels[added[0] - 1]
            where = []
            if named:
                where.append("seq " + ", ".join(str(s) for s in named[:10]))
            if added:
                lines = ", ".join(str(n) for n in added[:10])
                what = (
                    "lines {} (not entries)"
                    if len(added) > 1
                    else "line {} (not an entry)"
                )
                where.append(what.format(lines))
            message = (
                f"checkpoint of {size} entries does not match the log (root differs): "
                f"see {' and '.join(where)}{later}"
            )
        else:
            first_without = bisect.bisect_left(self.no_prev, max(low, 1))
            chained = (
                first_without == len(self.no_prev)
                or self.no_prev[first_without] >= size
            )
            if chained:
                message = (
                    f"checkpoint of {size} entries does not match the log (root "
                    f"differs); the 'prev' chain holds up to here, so the last signed "
                    f"entry, seq {last}, was altered{later}"
                )
            else:
                message = (
                    f"checkpoint of {size} entries does not match the log (root "
                    f"differs): an entry in seq {low}..{size - 1} was altered (these "
                    f"entries carry no 'prev', so which one cannot be told){later}"
                )
        self.add(seq, ERROR, "checkpoint_root", message)


_LISTED = 10
"""Missing notes named one by one; more are summed up in one finding."""


def _where_range(first: CheckpointRecord, last: CheckpointRecord) -> str:
    """Return ``checkpoints.jsonl lines 1..41`` (or ``A to B`` for other files)."""
    head, _, start = first.where.rpartition(" line ")
    other, _, end = last.where.rpartition(" line ")
    if head and head == other:
        return f"{head} lines {start}..{end}"
    return f"{first.where} to {last.where}"


def _count(n: int, noun: str) -> str:
    """Return ``1 checkpoint`` or ``3 checkpoints``."""
    return f"{n} {noun}{'s' * (n != 1)}"


def _seq_range(first: int, last: int) -> str:
    """Return ``entry seq 4`` or ``entries seq 4..9``."""
    if first == last:
        return f"entry seq {first} is"
    return f"entries seq {first}..{last} are"


# --- entry contents -------------------------------------------------------------------

_DAY_MS: dict[str, int] = {}
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def parse_time_ms(text: Any) -> int | None:
    """Return ``YYYY-MM-DDTHH:MM:SS.mmmZ`` as UTC milliseconds, or ``None`` if it is
    not exactly that form (the only form entries use)."""
    if type(text) is not str or _TIME.fullmatch(text) is None:
        return None
    day = _DAY_MS.get(text[:10])
    if day is None:
        try:
            moment = datetime.strptime(text[:10], "%Y-%m-%d")
        except ValueError:
            return None
        day = int(moment.replace(tzinfo=UTC).timestamp()) * 1000
        if len(_DAY_MS) > 100_000:
            _DAY_MS.clear()
        _DAY_MS[text[:10]] = day
    hours, minutes, seconds = int(text[11:13]), int(text[14:16]), int(text[17:19])
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return day + ((hours * 60 + minutes) * 60 + seconds) * 1000 + int(text[20:23])


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int


_OPTIONAL_TEXT = ("obis", "unit", "raw", "q")


def _well_formed(entry: Mapping[str, Any], t_ms: int | None) -> bool:
    """Fast check of the common case; ``_shape_problem`` says what is wrong."""
    get = entry.get
    v, seq, mono, boot = get("v"), get("seq"), get("mono"), get("boot")
    if not (
        t_ms is not None
        and v == 1
        and type(v) is int
        and type(seq) is int
        and type(mono) is int
        and type(boot) is int
        and seq >= 0
        and mono >= 0
        and boot >= 0
        and get("tq") in TIME_QUALITIES
        and type(get("prev", "")) is str
    ):
        return False
    kind = get("type")
    if kind == "event":
        ev = get("ev")
        return type(ev) is str and ev != ""
    if kind != "reading":
        return False
    src, sseq, state, value = get("src"), get("sseq"), get("st"), get("val")
    return (
        type(src) is str
        and src != ""
        and type(sseq) is int
        and sseq >= 0
        and state in READING_STATES
        and (
            (value is None and state != "G")
            or (type(value) is str and _DECIMAL.fullmatch(value) is not None)
        )
        and type(get("obis", "")) is str
        and type(get("unit", "")) is str
        and type(get("raw", "")) is str
        and type(get("q", "")) is str
    )


def _shape_problem(entry: Mapping[str, Any], t_ms: int | None) -> str | None:
    """Return what is wrong with the fields of ``entry``, or ``None``.

    ``t_ms`` is ``parse_time_ms(entry["t"])``, parsed once by the caller.
    """
    if entry.get("v") != 1 or not _is_int(entry.get("v")):
        return f"schema version 'v' is {entry.get('v')!r}, expected 1"
    for name in ("seq", "mono", "boot"):
        value = entry.get(name)
        if not _is_int(value) or value < 0:
            return f"'{name}' must be an integer >= 0, got {value!r}"
    if t_ms is None:
        return f"'t' {entry.get('t')!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ"
    if entry.get("tq") not in TIME_QUALITIES:
        return f"time quality 'tq' {entry.get('tq')!r} is not S, I or U"
    if "prev" in entry and not isinstance(entry["prev"], str):
        return "'prev' must be a base64 string"
    kind = entry.get("type")
    if kind == "event":
        if not isinstance(entry.get("ev"), str) or not entry["ev"]:
            return "an event needs its kind in 'ev'"
        return None
    if kind != "reading":
        return f"'type' {kind!r} is neither 'reading' nor 'event'"
    if not isinstance(entry.get("src"), str) or not entry["src"]:
        return "a reading needs its source in 'src'"
    sseq = entry.get("sseq")
    if not _is_int(sseq) or sseq < 0:
        return f"'sseq' must be an integer >= 0, got {sseq!r}"
    state = entry.get("st")
    if state not in READING_STATES:
        return f"reading state 'st' {state!r} is not one of G N T E S L"
    value = entry.get("val")
    if value is None:
        if state == "G":
            return "a good reading (st G) needs its value in 'val'"
    elif not isinstance(value, str) or _DECIMAL.fullmatch(value) is None:
        return f"'val' {value!r} is not an exact decimal string"
    for name in _OPTIONAL_TEXT:
        if name in entry and not isinstance(entry[name], str):
            return f"'{name}' must be a string"
    return None


_CUMULATIVE_OBIS: dict[str, bool] = {}


def _is_cumulative(entry: Mapping[str, Any]) -> bool:
    """Cumulative register: ``cum`` true, or an OBIS code whose D group is 8."""
    if entry.get("cum") is True:
        return True
    obis = entry.get("obis")
    if not isinstance(obis, str):
        return False
    known = _CUMULATIVE_OBIS.get(obis)
    if known is None:
        parts = obis.partition(":")[2].split("*")[0].split(".")
        known = len(parts) >= 2 and parts[1] == "8"
        if len(_CUMULATIVE_OBIS) < 10_000:
            _CUMULATIVE_OBIS[obis] = known
    return known


def _iso(t_ms: int) -> str:
    moment = datetime.fromtimestamp(t_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + "Z"


@dataclass
class _Segment:
    """One boot of the agent: from its ``boot`` event to the last entry before the
    next one, with what the slot check needs."""

    boot_pos: int
    boot_label: int
    start_ms: int
    interval_ms: int | None
    zone: ZoneInfo | None
    end_ms: int = 0
    end_label: int = 0
    clean: bool = False
    end_pos: int = 0
    """Position of the last stored line of this boot."""
    offsets: dict[int, int] = field(default_factory=dict)
    """UTC hour -> UTC offset (ms) of the zone then."""
    present: dict[str, set[int]] = field(default_factory=dict)
    """Source -> slot indices with a cumulative reading."""
    first_slot: dict[str, int] = field(default_factory=dict)
    """Source first seen in this boot -> its first slot."""
    explained: dict[str, dict[int, int]] = field(default_factory=dict)
    """Source -> slot index -> seq of the ``read_error`` naming it."""
    stepped: list[tuple[int, int, int]] = field(default_factory=list)
    """(from_ms, to_ms, seq): wall-clock windows skipped by a forward step."""
    sources_before: set[str] = field(default_factory=set)
    """Sources with cumulative readings before this boot: expected from its start."""


class _EntryCheck:
    """Checks of entry contents: fields, per-source counters, cumulative registers,
    interval slots, crash recoveries and clock steps."""

    def __init__(self, check: _LogCheck) -> None:
        self.check = check
        self.add = check.add
        self.sseq: dict[str, tuple[int, int]] = {}
        """src -> (last sseq, disturbance count when it was read)."""
        self.sseq_outlier: dict[str, int] = {}
        """src -> the sseq its last reading should have had, when it had another."""
        self.cumulative: dict[tuple[str, str], tuple[Decimal, int, int]] = {}
        """(src, quantity) -> (value, position, seq) of the last reading."""
        self.explained_by: dict[str, tuple[int, int, str]] = {}
        """src (or '*' for all) -> (position, seq, kind) of the last event that
        explains a jump."""
        self.highest = -1
        """Highest seq whose contents were checked."""
        self.known_sources: set[str] = set()
        self.event_sources: set[str] = set()
        """Sources whose latest ``source`` event declares ``"cadence": "event"``:
        they read when something happens (a charging session), not per interval
        slot, so no slot is missing for them."""
        self.segment: _Segment | None = None
        self.boot: int | None = None
        self.offset_ms: int | None = None
        self.mono_per_ms = 1_000_000
        """Units of ``mono`` per millisecond in the current boot (ns by default)."""
        self.pending_steps: list[tuple[int, int, int]] = []
        """(position, seq, delta_ms) of clock steps awaiting an explaining event."""
        self.disturbed = 0

    def line(
        self, pos: int, seq: int, entry: dict[str, Any] | None, structural: int
    ) -> int:
        """Check the contents of the line at ``pos`` reported as ``seq``; return its
        time (UTC ms) or ``_NONE``."""
        if entry is None or structural:
            # Unreadable, misplaced or after a gap: per-source counters across it
            # prove nothing (the line itself was reported). A duplicate or an
            # entry stored late is not checked again.
            self.disturbed += 1
            if entry is None or seq <= self.highest:
                return _NONE
        self.highest = max(self.highest, seq)
        return self._entry(pos, seq, entry)

    def finish(self, count: int) -> None:
        """Conclude after the last of ``count`` lines."""
        self._resolve_steps(count + TIME_STEP_LOOKAHEAD + 1)
        self._close_segment(None)

    def _entry(self, pos: int, seq: int, entry: dict[str, Any]) -> int:
        t_ms = parse_time_ms(entry.get("t"))
        if t_ms is None or not _well_formed(entry, t_ms):
            problem = _shape_problem(entry, t_ms)
            self.add(seq, ERROR, "bad_entry", f"entry is not valid: {problem}", pos=pos)
            self.disturbed += 1
            return _NONE
        ev = entry.get("ev")
        if ev == "boot":
            self._boot(pos, seq, entry, t_ms)
        elif self.boot is None:
            self.boot = entry["boot"]
        elif entry["boot"] != self.boot:
            self.add(
                seq,
                WARNING,
                "boot_counter",
                f"boot counter changes from {self.boot} to {entry['boot']} without a "
                "boot event",
            )
            self.boot = entry["boot"]
            self.offset_ms = None
        self._time(pos, seq, entry, t_ms, ev)
        segment = self.segment
        if segment is not None:
            if t_ms > segment.end_ms:
                segment.end_ms = t_ms
            segment.end_pos = pos
            segment.end_label = seq
            segment.clean = ev == "shutdown"
        if entry["type"] == "reading":
            self._reading(pos, seq, entry, t_ms)
        elif ev in EXPLAINS_CUMULATIVE:
            src = entry.get("src")
            self.explained_by["*" if not isinstance(src, str) else src] = (pos, seq, ev)
            if ev == "read_error" and isinstance(src, str):
                self._read_error(seq, src, entry, t_ms)
            elif ev == "source" and isinstance(src, str):
                if entry.get("cadence") == "event":
                    self.event_sources.add(src)
                else:
                    self.event_sources.discard(src)
        return t_ms

    # --- boots and outages ------------------------------------------------------------

    def _boot(self, pos: int, seq: int, entry: Mapping[str, Any], t_ms: int) -> None:
        previous = self.segment
        if self.boot is not None and entry["boot"] <= self.boot:
            self.add(
                seq,
                WARNING,
                "boot_counter",
                f"boot counter {entry['boot']} does not increase (was {self.boot})",
            )
        self.boot = entry["boot"]
        self.offset_ms = None
        # Monotonic time is in ns unless the boot says otherwise (our agent writes µs
        # so that `mono` stays below 2^53 for centuries of uptime, not 104 days).
        self.mono_per_ms = 1_000 if entry.get("mono_unit") == "us" else 1_000_000
        self._resolve_steps(pos + TIME_STEP_LOOKAHEAD + 1)
        interval = entry.get("interval_s")
        interval_ms = interval * 1000 if _is_int(interval) and interval > 0 else None
        zone: ZoneInfo | None = None
        tz = entry.get("tz")
        if interval_ms is not None:
            try:
                zone = ZoneInfo(tz if isinstance(tz, str) else "UTC")
            except (ZoneInfoNotFoundError, ValueError):
                zone = ZoneInfo("UTC")
        segment = _Segment(pos, seq, t_ms, interval_ms, zone, end_ms=t_ms)
        segment.sources_before = set(self.known_sources)
        self._close_segment(segment)
        recovered = entry.get("recovered")
        if isinstance(recovered, dict):
            cut = recovered.get("truncated_bytes")
            last = recovered.get("last_seq")
            self.add(
                seq,
                WARNING,
                "recovered",
                f"on start the agent cut {cut} bytes of an incomplete entry after seq "
                f"{last} (crash or power cut during a write)",
            )
        shutdown = entry.get("prev_shutdown")
        if shutdown == "unclean" or (
            shutdown is None and previous is not None and not previous.clean
        ):
            since = f" after seq {previous.end_label}" if previous else ""
            gap = self._outage_text(previous, t_ms)
            self.add(
                seq,
                WARNING,
                "unclean_shutdown",
                f"the agent stopped without a shutdown entry{since} (crash, kill or "
                f"power cut) and started again here{gap}",
            )
        elif previous is not None:
            gap = self._outage_text(previous, t_ms)
            if gap:
                self.add(
                    seq,
                    WARNING,
                    "outage",
                    f"the agent was stopped (shutdown at seq {previous.end_label}) "
                    f"until this boot{gap}",
                )

    def _outage_text(self, previous: _Segment | None, t_ms: int) -> str:
        if previous is None or previous.interval_ms is None:
            return ""
        missed = len(self._boundaries(previous, previous.end_ms, t_ms))
        if not missed:
            return ""
        return (
            f"; {missed} interval slot(s) from {_iso(previous.end_ms)} to "
            f"{_iso(t_ms)} were not read"
        )

    # --- clock steps ------------------------------------------------------------------

    def _time(
        self, pos: int, seq: int, entry: Mapping[str, Any], t_ms: int, ev: Any
    ) -> None:
        if ev in ("time_step", "time_sync"):
            for _, step_seq, delta in self.pending_steps:
                self._explained_step(step_seq, delta, seq, ev)
            self.pending_steps.clear()
        if self.pending_steps:
            self._resolve_steps(pos)
        offset = t_ms - entry["mono"] // self.mono_per_ms
        if self.offset_ms is not None:
            delta = offset - self.offset_ms
            if abs(delta) > TIME_STEP_LIMIT_MS:
                if ev in ("time_step", "time_sync"):
                    self._explained_step(seq, delta, seq, ev)
                else:
                    self.pending_steps.append((pos, seq, delta))
                if delta > 0 and self.segment is not None:
                    self.segment.stepped.append((t_ms - delta, t_ms, seq))
        self.offset_ms = offset

    def _explained_step(self, seq: int, delta: int, by_seq: int, ev: str) -> None:
        self.add(
            seq,
            WARNING,
            "time_step",
            f"gateway clock stepped by {delta / 1000:+.3f} s against the monotonic "
            f"clock ({ev} event seq {by_seq})",
        )

    def _resolve_steps(self, pos: int) -> None:
        keep = []
        for step_pos, step_seq, delta in self.pending_steps:
            if pos - step_pos > TIME_STEP_LOOKAHEAD:
                self.add(
                    step_seq,
                    WARNING,
                    "time_step_unexplained",
                    f"gateway clock jumped by {delta / 1000:+.3f} s against the "
                    "monotonic clock with no time_step or time_sync event",
                )
            else:
                keep.append((step_pos, step_seq, delta))
        self.pending_steps = keep

    # --- readings ---------------------------------------------------------------------

    def _reading(self, pos: int, seq: int, entry: Mapping[str, Any], t_ms: int) -> None:
        src = entry["src"]
        sseq = entry["sseq"]
        last = self.sseq.get(src)
        expected = 0 if last is None else last[0] + 1
        outlier = self.sseq_outlier.pop(src, None)
        if outlier is not None and sseq == outlier + 1:
            # The reading before was the odd one out (already reported): the
            # counter runs on from what it should have been.
            expected = sseq
        elif sseq != expected and (last is None or last[1] == self.disturbed):
            self.sseq_outlier[src] = expected
            what = "missing" if sseq > expected else "repeated"
            self.add(
                seq,
                ERROR,
                "sseq_gap",
                f"reading of {src} has per-source counter sseq {sseq}, expected "
                f"{expected}: readings of this source are {what}",
                pos=pos,
            )
        self.sseq[src] = (sseq, self.disturbed)
        text = entry.get("val")
        if text is None or not _is_cumulative(entry):
            return
        value = Decimal(text)  # checked by _well_formed
        quantity = entry.get("obis") or entry.get("q") or ""
        key = (src, quantity)
        previous = self.cumulative.get(key)
        self.cumulative[key] = (value, pos, seq)
        self.known_sources.add(src)
        self._slot_present(src, t_ms)
        if previous is None or value >= previous[0]:
            return
        no_event = (-1, -1, "")
        by = max(
            self.explained_by.get(src, no_event), self.explained_by.get("*", no_event)
        )
        if by[0] > previous[1]:
            self.add(
                seq,
                WARNING,
                "cumulative_decrease_explained",
                f"cumulative register {src} {quantity} went down from {previous[0]} "
                f"(seq {previous[2]}) to {value}, after a {by[2]} event (seq {by[1]})",
            )
        else:
            self.add(
                seq,
                WARNING,
                "cumulative_decrease",
                f"cumulative register {src} {quantity} went down from {previous[0]} "
                f"(seq {previous[2]}) to {value} with no read_error, config_change or "
                "source event for it in between",
            )

    # --- interval slots ---------------------------------------------------------------

    def _slot_index(self, segment: _Segment, t_ms: int) -> int:
        """Local-time slot index of ``t_ms``: slot k starts at boundary k."""
        assert segment.interval_ms is not None and segment.zone is not None
        hour = t_ms // 3_600_000
        offset = segment.offsets.get(hour)
        if offset is None:
            moment = datetime.fromtimestamp(hour * 3600, tz=UTC)
            delta = segment.zone.utcoffset(moment)
            offset = int(delta.total_seconds() * 1000) if delta is not None else 0
            segment.offsets[hour] = offset
        return (t_ms + offset) // segment.interval_ms

    def _boundary_ms(self, segment: _Segment, index: int) -> int:
        """UTC ms of the start of slot ``index`` (inverse of ``_slot_index``)."""
        assert segment.interval_ms is not None
        local = index * segment.interval_ms
        # The offset of the hour the boundary falls in; zones without daylight
        # saving make this exact.
        guess = local - self._offset_at(segment, local)
        return local - self._offset_at(segment, guess)

    def _offset_at(self, segment: _Segment, t_ms: int) -> int:
        self._slot_index(segment, t_ms)  # fills the cache
        return segment.offsets[t_ms // 3_600_000]

    def _boundaries(self, segment: _Segment, after_ms: int, until_ms: int) -> range:
        """Slot indices whose boundary lies in (after_ms, until_ms]."""
        if segment.interval_ms is None or until_ms <= after_ms:
            return range(0)
        first = self._slot_index(segment, after_ms) + 1
        last = self._slot_index(segment, until_ms)
        return range(first, last + 1)

    def _slot_present(self, src: str, t_ms: int) -> None:
        segment = self.segment
        if segment is None or segment.interval_ms is None:
            return
        index = self._slot_index(segment, t_ms)
        segment.present.setdefault(src, set()).add(index)
        segment.first_slot.setdefault(src, index)

    def _read_error(
        self, seq: int, src: str, entry: Mapping[str, Any], t_ms: int
    ) -> None:
        segment = self.segment
        if segment is None or segment.interval_ms is None:
            return
        named: list[Any] = []
        if "slot" in entry:
            named.append(entry["slot"])
        if isinstance(entry.get("slots"), list):
            named.extend(entry["slots"])
        indices = set()
        for item in named:
            slot_ms = parse_time_ms(item) if isinstance(item, str) else None
            if slot_ms is None and isinstance(item, str):
                try:
                    slot_ms = int(
                        datetime.fromisoformat(item.replace("Z", "+00:00")).timestamp()
                        * 1000
                    )
                except ValueError:
                    slot_ms = None
            if slot_ms is not None:
                indices.add(self._slot_index(segment, slot_ms))
        if not indices:
            indices.add(self._slot_index(segment, t_ms))
        explained = segment.explained.setdefault(src, {})
        for index in indices:
            explained.setdefault(index, seq)

    def _close_segment(self, new: _Segment | None) -> None:
        """Check the slots of the boot that just ended, then start ``new``."""
        segment = self.segment
        self.segment = new
        if segment is None or segment.interval_ms is None:
            return
        grace = min(segment.interval_ms // 2, 60_000)
        expected = self._boundaries(segment, segment.start_ms, segment.end_ms - grace)
        if not len(expected):
            return
        for src in sorted(self.known_sources | set(segment.present)):
            if src in self.event_sources:
                continue
            present = segment.present.get(src, set())
            first = segment.first_slot.get(src)
            explained = segment.explained.get(src, {})
            missing_unexplained: list[int] = []
            missing_explained: list[tuple[int, int]] = []
            for index in expected:
                if index in present or (first is not None and index < first):
                    continue
                if first is None and src not in segment.sources_before:
                    continue
                if index in explained:
                    missing_explained.append((index, explained[index]))
                    continue
                boundary = self._boundary_ms(segment, index)
                step = next(
                    (s for a, b, s in segment.stepped if a < boundary <= b), None
                )
                if step is not None:
                    missing_explained.append((index, step))
                else:
                    missing_unexplained.append(index)
            self._report_slots(segment, src, missing_unexplained, missing_explained)

    def _seq_at(self, segment: _Segment, t_ms: int) -> int:
        """Return the seq of the first entry of ``segment`` at or after ``t_ms``."""
        times, labels = self.check.times, self.check.labels
        for pos in range(segment.boot_pos, segment.end_pos + 1):
            if pos < len(times) and times[pos] != _NONE and times[pos] >= t_ms:
                return labels[pos]
        return segment.end_label

    def _report_slots(
        self,
        segment: _Segment,
        src: str,
        unexplained: list[int],
        explained: list[tuple[int, int]],
    ) -> None:
        for start, end in _runs(unexplained):
            first_ms = self._boundary_ms(segment, start)
            seq = self._seq_at(segment, first_ms)
            count = end - start + 1
            self.add(
                seq,
                WARNING,
                "slot_missing",
                f"{src}: no cumulative reading for {count} interval slot(s) from "
                f"{_iso(first_ms)}"
                + (f" to {_iso(self._boundary_ms(segment, end))}" if count > 1 else "")
                + " and no read_error event explains it",
            )
        by_event: dict[int, list[int]] = {}
        for index, seq in explained:
            by_event.setdefault(seq, []).append(index)
        for seq, indices in sorted(by_event.items()):
            first_ms = self._boundary_ms(segment, min(indices))
            count = len(indices)
            self.add(
                seq,
                WARNING,
                "slot_explained",
                f"{src}: {count} interval slot(s) from {_iso(first_ms)} without a "
                "reading, explained by this event",
            )


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Group sorted integers into (first, last) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs
