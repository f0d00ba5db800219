"""Self-update: install a signed package; keep it only if the agent comes up healthy.

``ies-agent update apply MANIFEST`` (as root) takes a signed manifest from the upstream
(an ``https://`` or ``http://`` URL; the signature, not the transport, is what is
trusted) or from a USB stick (a path; the package is the manifest's ``file`` beside
it), and goes through these steps, each one recorded as an ``update`` event in the
evidence log (``step`` names it; ``id`` is ``<update id>/<n>``; ``at`` is when it
happened):

1. ``verified`` or ``rejected``: the manifest is signed by a trusted publisher key
   (``/etc/ies-agent/trust/*.pem``; ``ies_agent.signing.manifest``, the verifier the
   firmware bridge shares), names this package and this machine's architecture, the
   package file has the signed size and SHA-256, its own control fields agree with the
   manifest, and it is not older than the installed version (unless allowed). A
   rejection changes nothing.
2. ``saved_previous``: the installed version's package is kept for rollback, from the
   package cache (``<data>/updates/packages/``) or, the first time, rebuilt from the
   dpkg database. No way back, no update.
3. ``installing``, then ``installed`` or ``install_failed``: the agent is stopped and
   the package installed with ``dpkg --install`` (non-interactive, keeping changed
   configuration files).
4. ``healthy`` or ``unhealthy``: the agent is started and must report healthy within
   the time limit: its health file (``/run/ies-agent/health.json``, written only while
   every loop beats, see ``ies_agent.systemd``) shows the new version and its beat
   counter advances.
5. ``rolling_back``, then ``rolled_back`` (and ``rollback_healthy`` or
   ``rollback_unhealthy``) or ``rollback_failed``: the previous package is installed
   again and the agent restarted.

How steps reach the evidence log. The running agent holds the log's lock, so the
updater writes each step first to a journal (``<data>/updates/journal.jsonl``, one
fsynced JSON line per step). Whoever holds the log copies pending steps in: the
updater itself while the agent is stopped, and the running agent (a task started by
``ies_agent.systemd.ServiceLink``) every few seconds. After a crash between copying and
marking, a step may be recorded twice, with the same ``id``; none is lost.

The updater never imports agent code after ``dpkg`` replaced it on disk: everything it
needs after installing is imported when this module is, and steps after the install go
through the journal (the new or restored agent records them).

Errors::

    UpdateError            base; the message says what happened and what to do
    ├── UpdateRejected     a check failed before anything was changed
    ├── DpkgError          dpkg, dpkg-deb or dpkg-query failed (stderr attached)
    └── UpdateBusyError    another update holds the update lock
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Imported here, not when first used: after dpkg has replaced the agent's files on disk,
# the updater must not load any module of the new version (see the module docstring).
from ies_agent.evidence import keys
from ies_agent.evidence.errors import EvidenceError, LogLockedError
from ies_agent.evidence.log import EvidenceLog
from ies_agent.signing.manifest import (
    Manifest,
    ManifestError,
    TrustStore,
    verify_manifest,
    verify_payload,
)
from ies_agent.systemd import read_health

# keys imports the signed-note module lazily; load it now for the same reason.
importlib.import_module("ies_agent.evidence.note")

log = logging.getLogger(__name__)

UPDATE_EVENT = "update"
"""Kind of the evidence-log events this module records."""
UPDATES_DIR = "updates"
JOURNAL_FILE = "journal.jsonl"
RECORDED_FILE = "journal.recorded"
PACKAGES_DIR = "packages"
LOCK_FILE = "update.lock"
DEFAULT_PACKAGE = "ies-agent"
DEFAULT_TRUST_DIRS = (Path("/etc/ies-agent/trust"),)
DEFAULT_DATA_DIR = Path("/var/lib/ies-agent")
DEFAULT_HEALTH_FILE = Path("/run/ies-agent/health.json")
DEFAULT_HEALTH_TIMEOUT_S = 180.0
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
"""Largest package the updater downloads (the agent's package is about 15 MB)."""

_CONTROL_FIELD = re.compile(r"^([A-Za-z0-9-]+):\s?(.*)$")
_KEPT_CONTROL_FIELDS = (
    "Package",
    "Version",
    "Architecture",
    "Maintainer",
    "Installed-Size",
    "Pre-Depends",
    "Depends",
    "Recommends",
    "Suggests",
    "Breaks",
    "Conflicts",
    "Replaces",
    "Provides",
    "Section",
    "Priority",
    "Homepage",
    "Description",
)
_MAINTAINER_SCRIPTS = ("preinst", "postinst", "prerm", "postrm", "config", "templates")


class UpdateError(Exception):
    """Base of the self-update errors."""


class UpdateRejected(UpdateError):
    """Raised when a manifest or package fails a check; nothing was changed."""


class DpkgError(UpdateError):
    """Raised when ``dpkg``, ``dpkg-deb`` or ``dpkg-query`` fails."""


class UpdateBusyError(UpdateError):
    """Raised when another ``ies-agent update`` holds the update lock."""


# --- the journal ----------------------------------------------------------------------


class EventSink(Protocol):
    """What recording steps needs of the evidence log."""

    def append_event(
        self,
        ev: str,
        fields: Mapping[str, Any] | None = None,
        *,
        src: str | None = None,
    ) -> int:
        """Append one event; return its ``seq``."""
        ...

    def sync(self) -> int:
        """fsync the log; return the highest durable ``seq``."""
        ...


class UpdateJournal:
    """Update steps waiting to be recorded in the evidence log, one JSON line each.

    ``journal.jsonl`` only grows; ``journal.recorded`` holds how many of its lines
    are in the evidence log. Both live in ``directory`` (``<data>/updates``).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_FILE
        self.recorded_path = self.directory / RECORDED_FILE

    def append(self, step: str, step_id: str, fields: Mapping[str, Any]) -> None:
        """Append step ``step`` (id ``step_id``) with ``fields``, durably.

        ``fields`` hold text and integers only (the evidence log takes no floats).
        Raises ``OSError`` when the journal cannot be written.
        """
        record = {"step": step, "id": step_id, "at": _utc_now(), **fields}
        line = json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def lines(self) -> list[bytes]:
        """Return the complete lines of the journal (a torn last line is left out)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        return complete.splitlines()

    def recorded(self) -> int:
        """Return how many journal lines are in the evidence log."""
        try:
            return int(self.recorded_path.read_text(encoding="ascii").strip() or "0")
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self) -> list[dict[str, Any]]:
        """Return the steps not yet recorded, oldest first.

        A line that is not a JSON object becomes a ``journal_unreadable`` step naming
        its line number, so damage is recorded rather than hidden.
        """
        lines = self.lines()
        steps = []
        for number, line in enumerate(lines[self.recorded() :], self.recorded() + 1):
            try:
                step = json.loads(line)
            except ValueError:
                step = None
            if not isinstance(step, dict) or not isinstance(step.get("step"), str):
                step = {"step": "journal_unreadable", "line": number}
            steps.append(step)
        return steps

    def mark_recorded(self, count: int) -> None:
        """Store that the first ``count`` lines are in the evidence log (atomically)."""
        tmp = self.recorded_path.with_name(RECORDED_FILE + ".tmp")
        tmp.write_text(f"{count}\n", encoding="ascii")
        os.replace(tmp, self.recorded_path)


def record_pending(sink: EventSink, journal: UpdateJournal) -> int:
    """Append the journal's pending steps to ``sink`` as ``update`` events.

    The log is fsynced before the steps are marked recorded. Returns how many steps
    were recorded. Raises ``OSError`` when the journal cannot be read or marked, and
    what ``sink`` raises.
    """
    done = journal.recorded()
    steps = journal.pending()
    if not steps:
        return 0
    for step in steps:
        sink.append_event(UPDATE_EVENT, _event_fields(step))
    sink.sync()
    journal.mark_recorded(done + len(steps))
    return len(steps)


def _event_fields(step: Mapping[str, Any]) -> dict[str, Any]:
    """Return the event fields of a journal step: text and integers only."""
    fields: dict[str, Any] = {}
    for key, value in step.items():
        if key in ("seq", "t", "type", "v", "ev", "src", "sseq", "tq", "mono", "boot"):
            key = f"update_{key}"
        if isinstance(value, bool) or not isinstance(value, int | str):
            value = str(value)
        fields[key] = value
    return fields


async def drain_journal(
    sink: EventSink, data_dir: Path, stop: asyncio.Event, *, every_s: float = 5.0
) -> None:
    """Record pending update steps in the running agent's log until ``stop`` is set.

    A journal that cannot be read is logged once; the agent keeps running.
    """
    journal = UpdateJournal(Path(data_dir) / UPDATES_DIR)
    failing = False
    while not stop.is_set():
        try:
            count = record_pending(sink, journal)
        except OSError as exc:
            if not failing:
                log.warning(
                    "cannot read the update journal",
                    extra={"kv": {"path": str(journal.path), "error": exc}},
                )
            failing = True
        else:
            failing = False
            if count:
                log.info("recorded update steps", extra={"kv": {"steps": count}})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)


def record_now(data_dir: Path, journal: UpdateJournal) -> int | None:
    """Record pending steps by opening the evidence log, if no agent holds it.

    Returns the number of steps recorded, or ``None`` when the log is held by a
    running agent (it records them itself) or has never been created (no key card
    yet: the steps wait for the first start). Raises ``EvidenceError`` for other
    problems with the log.
    """
    if not journal.pending():
        return 0
    card = keys.read_key_card(data_dir)
    if card is None:
        return None
    try:
        evidence = EvidenceLog.open(
            data_dir, gateway_id=str(card["gateway_id"]), origin=card.get("origin")
        )
    except LogLockedError:
        return None
    try:
        return record_pending(evidence, journal)
    finally:
        evidence.close()


# --- dpkg -----------------------------------------------------------------------------


class Dpkg:
    """dpkg, dpkg-deb and dpkg-query, on this system or on the tree at ``root``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else None

    def _root_args(self) -> list[str]:
        return [f"--root={self.root}"] if self.root is not None else []

    def _run(self, argv: Sequence[str], *, what: str) -> str:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                env=env,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise DpkgError(f"cannot run {argv[0]} to {what}: {exc.strerror}") from None
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise DpkgError(
                f"{argv[0]} failed to {what} (exit {done.returncode}): {tail}"
            )
        return done.stdout

    def architecture(self) -> str:
        """Return this machine's Debian architecture (``arm64``, ``amd64``)."""
        return self._run(["dpkg", "--print-architecture"], what="name the arch").strip()

    def installed_version(self, package: str) -> str | None:
        """Return the installed version of ``package``, or ``None`` if not installed."""
        try:
            out = self._run(
                [
                    "dpkg-query",
                    *self._root_args(),
                    "-W",
                    "-f=${db:Status-Abbrev}|${Version}",
                    package,
                ],
                what=f"look up {package}",
            )
        except DpkgError:
            return None
        status, _, version = out.partition("|")
        return version.strip() if status.startswith("ii") and version else None

    def deb_fields(self, deb: Path) -> dict[str, str]:
        """Return the control fields of the package file ``deb``."""
        out = self._run(["dpkg-deb", "--field", str(deb)], what=f"read {deb.name}")
        return _control_fields(out)

    def version_lt(self, older: str, newer: str) -> bool:
        """Return whether version ``older`` sorts before ``newer`` in dpkg's order."""
        done = subprocess.run(
            ["dpkg", "--compare-versions", older, "lt", newer], check=False
        )
        return done.returncode == 0

    def install(self, deb: Path) -> None:
        """Install ``deb`` without questions, keeping locally changed conffiles."""
        self._run(
            [
                "dpkg",
                *self._root_args(),
                "--force-confdef",
                "--force-confold",
                "--install",
                str(deb),
            ],
            what=f"install {deb.name}",
        )

    def repack(self, package: str, out_dir: Path) -> Path:
        """Rebuild the installed ``package`` as a ``.deb`` in ``out_dir``; return it.

        For rollback when the installed version's package file is gone: the files
        dpkg lists for the package (as they are now, so changed conffiles keep their
        changes), its maintainer scripts and control fields, owned by root. Raises
        :class:`DpkgError` when the package is not fully installed or cannot be built.
        """
        admin = (self.root or Path("/")) / "var/lib/dpkg"
        base = self.root or Path("/")
        status = self._run(
            ["dpkg-query", *self._root_args(), "--status", package],
            what=f"read the status of {package}",
        )
        fields = _control_fields(status)
        if "install ok installed" not in fields.get("Status", ""):
            raise DpkgError(f"{package} is not fully installed; cannot rebuild it")
        listing = self._run(
            ["dpkg-query", *self._root_args(), "--listfiles", package],
            what=f"list the files of {package}",
        )
        conffiles = [
            line.split()[0]
            for line in fields.get("Conffiles", "").splitlines()
            if line.strip()
            and "obsolete" not in line
            and "remove-on-upgrade" not in line
        ]
        name = deb_file_name(package, fields["Version"], fields["Architecture"])
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ies-repack-", dir=out_dir) as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            for line in listing.splitlines():
                _copy_listed(base, tree, line.strip())
            debian = tree / "DEBIAN"
            debian.mkdir()
            control = "".join(
                f"{key}: {fields[key]}\n"
                for key in _KEPT_CONTROL_FIELDS
                if key in fields
            )
            (debian / "control").write_text(control, encoding="utf-8")
            if conffiles:
                (debian / "conffiles").write_text(
                    "".join(f"{c}\n" for c in conffiles), encoding="utf-8"
                )
            for script in _MAINTAINER_SCRIPTS:
                source = admin / "info" / f"{package}.{script}"
                if source.exists():
                    shutil.copyfile(source, debian / script)
                    os.chmod(debian / script, 0o755)
            out = out_dir / name
            self._run(
                ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)],
                what=f"rebuild {name}",
            )
        return out


def _control_fields(text: str) -> dict[str, str]:
    """Parse deb822 control text (one paragraph) into a dict; continuations joined."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if line.startswith((" ", "\t")) and last:
            fields[last] += "\n" + line
            continue
        match = _CONTROL_FIELD.match(line)
        if match:
            last = match.group(1)
            fields[last] = match.group(2).strip()
    return fields


def _copy_listed(base: Path, tree: Path, listed: str) -> None:
    """Copy one path dpkg lists for a package from ``base`` into ``tree``."""
    if not listed.startswith("/") or listed in ("/", "/."):
        return
    source = base / listed.lstrip("/")
    target = tree / listed.lstrip("/")
    if source.is_symlink():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.readlink(source))
    elif source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, source.stat().st_mode & 0o7777)
    elif source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def deb_file_name(package: str, version: str, architecture: str) -> str:
    """Return the Debian file name of a package (an epoch's ``:`` as ``%3a``)."""
    return f"{package}_{version.replace(':', '%3a')}_{architecture}.deb"


def upstream_version(version: str) -> str:
    """Return the agent's own version inside Debian ``version``.

    ``1:0.2.0~rc1-1`` → ``0.2.0rc1``: the epoch and Debian revision dropped and the
    ``~`` of pre-releases removed, to compare with ``ies_agent.__version__``.
    """
    without_epoch = version.split(":", 1)[-1]
    upstream = (
        without_epoch.rsplit("-", 1)[0] if "-" in without_epoch else without_epoch
    )
    return upstream.replace("~", "")


# --- the service and its health -------------------------------------------------------


class ServiceControl(Protocol):
    """Stopping and starting the agent's service."""

    def stop(self) -> None:
        """Stop the agent and return once it has stopped."""
        ...

    def start(self) -> None:
        """Ask for the agent to start (returning before it is ready is fine)."""
        ...


class SystemdService:
    """The agent's systemd unit, through ``systemctl``.

    A failing ``systemctl`` is logged, not raised: whether the agent runs is judged by
    its health report afterwards.
    """

    def __init__(self, unit: str = "ies-agent.service") -> None:
        self.unit = unit

    def _systemctl(self, *args: str) -> None:
        done = subprocess.run(
            ["systemctl", *args, self.unit],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            log.warning(
                "systemctl failed",
                extra={"kv": {"args": " ".join(args), "detail": done.stderr.strip()}},
            )

    def stop(self) -> None:
        """``systemctl stop`` the unit (waits for the agent's clean shutdown)."""
        self._systemctl("stop")

    def start(self) -> None:
        """``systemctl start --no-block`` the unit; health is checked separately."""
        self._systemctl("start", "--no-block")


@dataclass(frozen=True)
class HealthVerdict:
    """Whether the agent reported healthy; ``reason`` says what was seen."""

    healthy: bool
    reason: str
    waited_s: float


class HealthProbe(Protocol):
    """Waits for the agent of a given version to report healthy."""

    def wait(self, version: str, timeout_s: float) -> HealthVerdict:
        """Wait up to ``timeout_s`` seconds for ``version`` to report healthy."""
        ...


class HealthFileProbe:
    """Reads the health file the agent's watchdog feeder writes while healthy.

    Healthy means: the file names the expected version and the same process raised
    its beat counter ``beats_needed`` times while we watched (a process that crashes
    and restarts starts over). Polls every ``poll_s`` seconds on the monotonic clock.
    """

    def __init__(
        self,
        path: Path = DEFAULT_HEALTH_FILE,
        *,
        beats_needed: int = 2,
        poll_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.beats_needed = beats_needed
        self.poll_s = poll_s

    def wait(self, version: str, timeout_s: float) -> HealthVerdict:
        """Wait for ``version`` (Debian or agent form) to report healthy."""
        wanted = upstream_version(version)
        started = time.monotonic()
        pid: object = None
        first_beats = 0
        last_seen = "no health report"
        while True:
            waited = time.monotonic() - started
            record = read_health(self.path)
            if record is not None:
                seen = str(record.get("version", ""))
                beats = record.get("beats")
                last_seen = f"version {seen} pid {record.get('pid')} beats {beats}"
                if upstream_version(seen) != wanted or not isinstance(beats, int):
                    pid = None
                elif record.get("pid") != pid:
                    pid, first_beats = record.get("pid"), beats
                elif beats - first_beats >= self.beats_needed:
                    return HealthVerdict(True, last_seen, waited)
            if waited >= timeout_s:
                return HealthVerdict(
                    False,
                    f"version {version} did not report healthy within "
                    f"{timeout_s:g} s (last seen: {last_seen})",
                    waited,
                )
            time.sleep(max(0.01, min(self.poll_s, timeout_s - waited)))


# --- applying an update ---------------------------------------------------------------


@dataclass(frozen=True)
class UpdateSettings:
    """Where the updater finds things and how long it waits.

    ``health_timeout_s`` is how long a new (or restored) version has to report healthy.
    """

    package: str = DEFAULT_PACKAGE
    trust_dirs: tuple[Path, ...] = DEFAULT_TRUST_DIRS
    data_dir: Path = DEFAULT_DATA_DIR
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S
    allow_downgrade: bool = False

    @property
    def state_dir(self) -> Path:
        """``<data>/updates``: journal, package cache, downloads, lock."""
        return Path(self.data_dir) / UPDATES_DIR


@dataclass(frozen=True)
class UpdateResult:
    """How an update ended.

    ``outcome`` is ``installed`` (the new version runs and is healthy),
    ``unchanged`` (that version was already installed), ``rolled-back`` (the new
    version was not healthy; the previous one was restored) or ``rollback-failed``
    (the gateway needs a person). ``recorded`` says whether the steps are already in
    the evidence log (else the agent records them when it next runs).
    """

    outcome: str
    version: str
    previous: str | None
    message: str
    update_id: str
    recorded: bool = False
    steps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the requested version is installed and healthy."""
        return self.outcome in ("installed", "unchanged")


class Updater:
    """Applies signed updates of the agent's package, with rollback.

    ``dpkg``, ``service`` and ``health`` are where the updater touches the system;
    tests give it a dpkg working on a scratch root, a service that runs a process, and
    the health file that process writes.
    """

    def __init__(
        self,
        settings: UpdateSettings,
        *,
        dpkg: Dpkg | None = None,
        service: ServiceControl | None = None,
        health: HealthProbe | None = None,
    ) -> None:
        self.settings = settings
        self.dpkg = dpkg or Dpkg()
        self.service: ServiceControl = service or SystemdService()
        self.health: HealthProbe = health or HealthFileProbe()
        self.journal = UpdateJournal(settings.state_dir)
        self._update_id = ""
        self._step_no = 0
        self._steps: list[str] = []

    # -- journal --------------------------------------------------------------------

    def _step(self, step: str, **fields: str | int) -> None:
        self._step_no += 1
        self._steps.append(step)
        self.journal.append(step, f"{self._update_id}/{self._step_no}", fields)
        log.info("update step", extra={"kv": {"step": step, **fields}})

    def _record(self) -> bool:
        """Copy pending steps into the evidence log if we can hold it now."""
        try:
            recorded = record_now(self.settings.data_dir, self.journal)
        except (EvidenceError, OSError) as exc:  # recorded later by the agent
            log.warning("cannot record update steps now", extra={"kv": {"error": exc}})
            return False
        return recorded is not None

    # -- the steps ------------------------------------------------------------------

    def apply(self, source: str, package: Path | None = None) -> UpdateResult:
        """Apply the update the manifest at ``source`` (path or URL) describes.

        ``package`` overrides where the package file is (default: the manifest's
        ``file`` beside the manifest). Returns how it ended; raises
        :class:`UpdateRejected` when a check failed (nothing changed; the rejection
        is journaled and recorded), :class:`UpdateBusyError` when another update
        runs, and ``OSError`` when the update directory cannot be written.
        """
        self._update_id = secrets.token_hex(8)
        self._step_no = 0
        self._steps = []
        state = self.settings.state_dir
        _make_state_dir(state, owner_of=Path(self.settings.data_dir))
        with _update_lock(state / LOCK_FILE):
            try:
                manifest, deb, previous = self._check(source, package)
            except UpdateRejected as exc:
                self._step("rejected", source=source, reason=str(exc)[:500])
                self._record()
                raise
            if previous == manifest.version:
                self._step("already_installed", version=manifest.version)
                return self._result(
                    "unchanged",
                    manifest.version,
                    previous,
                    f"{self.settings.package} {manifest.version} is installed already",
                )
            rollback = self._save_previous(previous)
            return self._install(manifest, deb, previous, rollback)

    def _check(self, source: str, package: Path | None) -> tuple[Manifest, Path, str]:
        """Verify everything before touching the system; raise UpdateRejected."""
        settings = self.settings
        try:
            trust = TrustStore.load(settings.trust_dirs)
            data, where = _read_source(source)
            manifest = verify_manifest(data, trust, source=source)
        except ManifestError as exc:
            raise UpdateRejected(str(exc)) from None
        except OSError as exc:
            raise UpdateRejected(f"cannot read manifest {source}: {exc}") from None
        if manifest.name != settings.package:
            raise UpdateRejected(
                f"{source} is for {manifest.name!r}, not {settings.package!r}"
            )
        try:
            arch = self.dpkg.architecture()
            if manifest.architecture != arch:
                raise UpdateRejected(
                    f"{source} is for architecture {manifest.architecture or '(none)'}"
                    f", this gateway is {arch}"
                )
            deb = package or _fetch_package(manifest, where, settings.state_dir)
            verify_payload(manifest, deb)
            fields = self.dpkg.deb_fields(deb)
        except (ManifestError, DpkgError, OSError) as exc:
            raise UpdateRejected(str(exc)) from None
        for key, wanted in (
            ("Package", manifest.name),
            ("Version", manifest.version),
            ("Architecture", arch),
        ):
            if fields.get(key) != wanted:
                raise UpdateRejected(
                    f"{deb.name} says {key}: {fields.get(key)}, its manifest says "
                    f"{wanted}; refusing a mislabelled package"
                )
        previous = self.dpkg.installed_version(settings.package)
        if previous is None:
            raise UpdateRejected(
                f"{settings.package} is not installed through dpkg here; install the "
                f"package with apt first (self-update only upgrades)"
            )
        if self.dpkg.version_lt(manifest.version, previous) and not (
            settings.allow_downgrade
        ):
            raise UpdateRejected(
                f"{manifest.version} is older than the installed {previous}; an old "
                f"signed manifest may be replayed to bring back fixed bugs. Use "
                f"--allow-downgrade if this is intended"
            )
        self._step(
            "verified",
            version=manifest.version,
            sha256=manifest.sha256,
            size=manifest.size,
            key=manifest.signed_by,
            source=source,
        )
        return manifest, deb, previous

    def _save_previous(self, previous: str) -> Path:
        """Keep the installed version's package for rollback; return its path."""
        cache = self.settings.state_dir / PACKAGES_DIR
        cache.mkdir(parents=True, exist_ok=True)
        arch = self.dpkg.architecture()
        cached = cache / deb_file_name(self.settings.package, previous, arch)
        how = "cache"
        if not cached.exists():
            try:
                cached = self.dpkg.repack(self.settings.package, cache)
            except (DpkgError, OSError) as exc:
                reason = f"cannot keep {previous} for rollback: {exc}"
                self._step("rejected", reason=reason[:500])
                self._record()
                raise UpdateRejected(reason) from None
            how = "rebuilt from the dpkg database"
        self._step("saved_previous", version=previous, file=cached.name, how=how)
        return cached

    def _install(
        self, manifest: Manifest, deb: Path, previous: str, rollback: Path
    ) -> UpdateResult:
        timeout = self.settings.health_timeout_s
        self.service.stop()
        self._step("installing", version=manifest.version, previous=previous)
        # The agent is stopped: record what happened so far while the log is free.
        self._record()
        try:
            self.dpkg.install(deb)
        except DpkgError as exc:
            self._step(
                "install_failed", version=manifest.version, reason=str(exc)[:500]
            )
            return self._roll_back(manifest.version, previous, rollback, str(exc))
        self._step("installed", version=manifest.version)
        self.service.start()
        verdict = self.health.wait(manifest.version, timeout)
        if verdict.healthy:
            self._step(
                "healthy", version=manifest.version, waited_s=int(verdict.waited_s)
            )
            self._keep_package(deb, rollback)
            return self._result(
                "installed",
                manifest.version,
                previous,
                f"{self.settings.package} {manifest.version} installed and healthy "
                f"after {verdict.waited_s:.0f} s",
            )
        self._step("unhealthy", version=manifest.version, reason=verdict.reason[:500])
        return self._roll_back(manifest.version, previous, rollback, verdict.reason)

    def _roll_back(
        self, version: str, previous: str, rollback: Path, why: str
    ) -> UpdateResult:
        self.service.stop()
        self._step("rolling_back", version=previous, failed=version)
        try:
            self.dpkg.install(rollback)
        except DpkgError as exc:
            self._step("rollback_failed", version=previous, reason=str(exc)[:500])
            return self._result(
                "rollback-failed",
                version,
                previous,
                f"{version} failed ({why}) and {previous} could not be restored: "
                f"{exc}. The gateway needs a person: reinstall {rollback}",
            )
        self._step("rolled_back", version=previous)
        self.service.start()
        verdict = self.health.wait(previous, self.settings.health_timeout_s)
        if verdict.healthy:
            self._step("rollback_healthy", version=previous)
        else:
            self._step("rollback_unhealthy", version=previous, reason=verdict.reason)
        return self._result(
            "rolled-back",
            version,
            previous,
            f"{version} was not healthy ({why}); restored {previous}"
            f"{'' if verdict.healthy else ', which does not report healthy either'}",
        )

    def _keep_package(self, deb: Path, rollback: Path) -> None:
        """Cache the new package (the next update's rollback); drop older ones."""
        cache = self.settings.state_dir / PACKAGES_DIR
        kept = cache / deb.name
        if deb.resolve() != kept.resolve():
            shutil.copyfile(deb, kept)
        for old in cache.glob("*.deb"):
            if old.name not in (kept.name, rollback.name):
                old.unlink(missing_ok=True)

    def _result(
        self, outcome: str, version: str, previous: str | None, message: str
    ) -> UpdateResult:
        # A running agent holds the log and records the steps itself within seconds.
        recorded = self._record() and not self.journal.pending()
        return UpdateResult(
            outcome,
            version,
            previous,
            message,
            self._update_id,
            recorded=recorded,
            steps=list(self._steps),
        )


# --- sources --------------------------------------------------------------------------


def _is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def _read_source(source: str) -> tuple[bytes, str]:
    """Return the manifest bytes and the base its package is found relative to."""
    if _is_url(source):
        return _download_bytes(source, 64 * 1024), source
    path = Path(source)
    return path.read_bytes(), str(path.resolve().parent)


def _fetch_package(manifest: Manifest, base: str, state_dir: Path) -> Path:
    """Return the package file: beside a local manifest, or downloaded from its URL."""
    if not _is_url(base):
        return Path(base) / manifest.file
    url = urllib.parse.urljoin(base, manifest.file)
    incoming = state_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    target = incoming / manifest.file
    _download_file(url, target, manifest.size)
    return target


def _download_bytes(url: str, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data: bytes = response.read(limit + 1)
    except (urllib.error.URLError, TimeoutError) as exc:
        raise OSError(f"cannot download {url}: {exc}") from None
    if len(data) > limit:
        raise OSError(f"{url} is larger than {limit} bytes")
    return data


def _download_file(url: str, target: Path, size: int) -> None:
    """Download ``url`` to ``target`` (via ``.part``), at most ``size`` bytes."""
    if size > MAX_DOWNLOAD_BYTES:
        raise OSError(f"{url}: {size} bytes is more than this updater downloads")
    part = target.with_name(target.name + ".part")
    try:
        with (
            urllib.request.urlopen(url, timeout=30) as response,
            part.open("wb") as out,
        ):
            received = 0
            while chunk := response.read(1 << 16):
                received += len(chunk)
                if received > size:
                    raise OSError(f"{url} is larger than its manifest says")
                out.write(chunk)
    except (urllib.error.URLError, TimeoutError) as exc:
        raise OSError(f"cannot download {url}: {exc}") from None
    os.replace(part, target)


# --- small helpers --------------------------------------------------------------------


def _make_state_dir(state: Path, *, owner_of: Path) -> None:
    """Create ``state`` and its journal, owned like ``owner_of`` when we are root.

    The agent (its own user) appends nothing but must mark steps recorded, so the
    directory and journal files belong to the owner of the data directory.
    """
    state.mkdir(parents=True, exist_ok=True)
    for name in (JOURNAL_FILE, RECORDED_FILE):
        (state / name).touch(mode=0o640)
    if os.geteuid() != 0:
        return
    info = owner_of.stat()
    for path in (state, state / JOURNAL_FILE, state / RECORDED_FILE):
        os.chown(path, info.st_uid, info.st_gid)


@contextlib.contextmanager
def _update_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpdateBusyError(
                f"another update is running (it holds {path}); wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)


def _utc_now() -> str:
    t = time.time()
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
        + f".{int(t % 1 * 1000):03d}Z"
    )
