"""First boot: take the site file an installer left on the boot partition.

An installer flashes the image, copies the site's configuration to the SD card's boot
partition as ``ies-agent.toml`` and powers the gateway on. Before the agent starts,
``ies-agent firstboot`` (the ``ies-agent-firstboot.service`` unit, as root) looks for
``/boot/firmware/ies-agent.toml`` (Raspberry Pi OS 12 "bookworm" and later mount the
boot partition there) and then ``/boot/ies-agent.toml`` (older images), and:

1. takes secrets out of the file (see below) into ``/etc/ies-agent/secrets/``, one
   file per secret at mode 0600, owned by the service user;
2. checks the result exactly as ``ies-agent config check`` does, line numbers and all
   (secret lines are rewritten in place, so every line keeps its number), plus that a
   ``data_dir`` the file sets is the one the service may write;
3. creates the gateway's signing key in ``/var/lib/ies-agent/keys/`` (kept if it
   exists) and writes its key card to the boot partition as
   ``ies-agent-key-card.json``, for the installer to hand to the utility;
4. moves the file to ``/etc/ies-agent/ies-agent.toml`` (replacing an earlier one and
   its secrets) and removes it from the boot partition (overwritten first: it held
   secrets, and anyone can read a FAT partition), with any old error report.

A file with a problem is left where it is, nothing in ``/etc/ies-agent`` changes and
``ies-agent-error.txt`` on the boot partition lists every problem as
``file:line: key: message`` with what to do. The agent's unit only starts when
``/etc/ies-agent/ies-agent.toml`` exists, so a gateway that never had a good file does
not run the agent, and one that had keeps running the configuration it had.

Secrets. A value is a secret when its key ends in ``password``, ``secret`` or ``token``
(``password``, ``client_secret``, ``api_token``), or when it sits in a top-level
``[secrets]`` table. An inline secret ``password = "…"`` (a one-line string) becomes
``password_file = "secrets/<path>"`` on the same line, where ``<path>`` is the key's
dotted path (``upstreams.0.password``); a ``[secrets]`` entry ``name = "…"`` becomes
the file ``secrets/name`` and the table is turned into comments, so other keys can
name it as ``<key>_file = "secrets/name"``. Paths are relative to the site file, as
every path in it is. A secret file holds the value exactly, with no newline.

Errors::

    FirstBootError   the file cannot be imported; ``problems`` lists every
                     ConfigProblem(file, line, key, message); the report is written
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ies_agent.config import Site

from ies_drivers.tomlsource import (
    KeyPath,
    SourceProblem,
    TomlSyntaxError,
    format_key_path,
    parse_toml,
)

BOOT_FILE = "ies-agent.toml"
ERROR_FILE = "ies-agent-error.txt"
KEY_CARD_FILE = "ies-agent-key-card.json"
SITE_FILE = "ies-agent.toml"
SECRETS_DIR = "secrets"
STAGING_DIR = ".firstboot"
BOOT_DIRS = (Path("/boot/firmware"), Path("/boot"))
"""Where the boot partition is mounted: Raspberry Pi OS 12+, then older images."""
DEFAULT_ETC_DIR = Path("/etc/ies-agent")
DEFAULT_DATA_DIR = Path("/var/lib/ies-agent")
SERVICE_USER = "ies-agent"
SECRET_SUFFIXES = ("password", "secret", "token")

_ONE_LINE_VALUE = re.compile(
    r"""^(?P<indent>\s*)(?P<key>[^=#]+?)(?P<eq>\s*=\s*)"""
    r"""(?P<value>"(?:[^"\\\n]|\\.)*"|'[^'\n]*')(?P<rest>\s*(?:#.*)?)$"""
)
_TABLE_HEADER = re.compile(r"^\s*\[")
_SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class FirstBootError(Exception):
    """Raised when the boot partition's site file cannot be imported.

    ``problems`` lists each problem with file, line and key; ``report`` is where the
    error report was written (None if it could not be).
    """

    def __init__(self, problems: Sequence[SourceProblem], report: Path | None) -> None:
        self.problems = list(problems)
        self.report = report
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class ImportResult:
    """What a successful import did: where things went and the key's fingerprint."""

    boot_file: Path
    site_file: Path
    key_card: Path
    fingerprint: str
    gateway_id: str
    secrets: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class _Secret:
    name: str
    value: str


def find_boot_file(boot_dirs: Sequence[Path] = BOOT_DIRS) -> Path | None:
    """Return the first ``ies-agent.toml`` found in ``boot_dirs``, or ``None``."""
    for directory in boot_dirs:
        candidate = Path(directory) / BOOT_FILE
        if candidate.is_file():
            return candidate
    return None


def import_site_file(
    boot_file: Path,
    *,
    etc_dir: Path = DEFAULT_ETC_DIR,
    data_dir: Path = DEFAULT_DATA_DIR,
    owner: str | None = None,
) -> ImportResult:
    """Import ``boot_file`` into ``etc_dir``; create the key in ``data_dir``.

    ``owner`` is the service user that must read the secrets and own the key (only
    applied when running as root). Returns what was done. Raises
    :class:`FirstBootError` (after writing ``ies-agent-error.txt`` beside
    ``boot_file``) when the file has problems or the key cannot be created; then
    nothing in ``etc_dir`` has changed.
    """
    from ies_agent.config import ConfigError, load_site
    from ies_agent.evidence import keys
    from ies_agent.evidence.errors import EvidenceError
    from ies_agent.evidence.log import default_origin

    boot_file = Path(boot_file)
    etc_dir, data_dir = Path(etc_dir), Path(data_dir)
    ids = _owner_ids(owner)
    staging = etc_dir / STAGING_DIR

    # Take the secrets out, keeping every line where it was.
    try:
        text, secrets = split_secrets(boot_file)
    except FirstBootError as exc:
        # Report the rest of the file's problems too, so one round trip fixes all.
        problems = list(exc.problems)
        try:
            load_site(boot_file)
        except ConfigError as config_exc:
            problems += [p for p in config_exc.problems if p not in problems]
        problems.sort(key=lambda p: p.line or 0)
        raise _reported(boot_file, problems) from None

    # Stage the result beside its final place, so relative paths resolve the same.
    etc_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging, 0o700)
    try:
        staged = staging / SITE_FILE
        staged.write_text(text, encoding="utf-8")
        _write_secrets(staging / SECRETS_DIR, secrets, ids)

        # Check it as the agent will load it.
        try:
            site = load_site(staged)
        except ConfigError as exc:
            problems = _relabel(exc.problems, staged, boot_file)
            raise _reported(boot_file, problems) from None
        problem = _data_dir_problem(boot_file, text, site.gateway.data_dir, data_dir)
        if problem is not None:
            raise _reported(boot_file, [problem])

        # The gateway's key and its card, back on the boot partition.
        origin = site.gateway.origin or default_origin(site.gateway.id)
        try:
            data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            key = keys.ensure_key(
                data_dir,
                gateway_id=site.gateway.id,
                origin=origin,
                alg=site.gateway.key_alg,
            )
            card = keys.read_key_card(data_dir) or {}
        except (EvidenceError, OSError) as exc:
            problem = SourceProblem(str(boot_file), None, "", f"gateway key: {exc}")
            raise _reported(boot_file, [problem]) from None
        if ids is not None:
            _chown_tree(data_dir, ids)
        card_file = boot_file.parent / KEY_CARD_FILE
        _write_boot_file(
            card_file, json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False)
        )

        # Make it the running configuration, then clear the boot partition.
        site_file = _commit(staging, etc_dir, ids)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _shred(boot_file)
    (boot_file.parent / ERROR_FILE).unlink(missing_ok=True)
    _fsync_dir(boot_file.parent)
    return ImportResult(
        boot_file=boot_file,
        site_file=site_file,
        key_card=card_file,
        fingerprint=key.fingerprint,
        gateway_id=site.gateway.id,
        secrets=tuple(secret.name for secret in secrets),
    )


def check_boot_file(path: Path) -> tuple[Site, int]:
    """Check a site file as first boot will use it: inline secrets taken out first.

    Returns the site and how many inline secrets first boot would move into files.
    Raises :class:`~ies_agent.config.ConfigError` naming the installer's own file and
    lines. Writes only into a private temporary directory, removed on return.
    """
    import tempfile

    from ies_agent.config import ConfigError, load_site

    path = Path(path)
    try:
        text, secrets = split_secrets(path)
    except FirstBootError as exc:
        raise ConfigError(exc.problems) from None
    with tempfile.TemporaryDirectory(prefix="ies-agent-check-") as tmp:
        staged = Path(tmp) / SITE_FILE
        staged.write_text(text, encoding="utf-8")
        _write_secrets(Path(tmp) / SECRETS_DIR, secrets, None)
        # Relative paths (templates, data_dir) resolve beside the installer's file.
        for entry in path.parent.iterdir():
            target = Path(tmp) / entry.name
            if not target.exists():
                target.symlink_to(entry)
        try:
            site = load_site(staged)
        except ConfigError as exc:
            raise ConfigError(_relabel(exc.problems, staged, path)) from None
    return dataclasses.replace(site, path=path), len(secrets)


# --- secrets --------------------------------------------------------------------------


def is_secret_key(name: str) -> bool:
    """Whether a key named ``name`` holds a secret (ends in password/secret/token)."""
    lowered = name.lower()
    return lowered.endswith(SECRET_SUFFIXES)


def split_secrets(path: Path) -> tuple[str, list[_Secret]]:
    """Return the text of the site file at ``path`` with its secrets taken out.

    Every line keeps its number: a secret line is rewritten in place and the lines of
    a ``[secrets]`` table become comments. Raises :class:`FirstBootError` (no report
    written) listing secrets that are not one-line strings and text that is not
    TOML.
    """
    shown = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        problem = SourceProblem(shown, None, "", f"cannot read: {exc.strerror}")
        raise FirstBootError([problem], None) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        problem = SourceProblem(
            shown, None, "", f"not UTF-8 text (byte {exc.start}): save it as UTF-8"
        )
        raise FirstBootError([problem], None) from None
    try:
        document = parse_toml(text, shown)
    except TomlSyntaxError as exc:
        raise FirstBootError(
            [SourceProblem(shown, exc.line, "", exc.reason)], None
        ) from None
    lines = text.splitlines(keepends=True)
    problems: list[SourceProblem] = []
    secrets: list[_Secret] = []

    def add(at: KeyPath, message: str) -> None:
        problems.append(
            SourceProblem(shown, document.line_of(at), format_key_path(at), message)
        )

    # Inline secrets: `password = "..."` -> `password_file = "secrets/<path>"`.
    for at, value in _walk(document.data):
        if not at or at[0] == "secrets" or not isinstance(at[-1], str):
            continue
        if not is_secret_key(at[-1]) or not isinstance(value, str):
            continue
        name = ".".join(str(part) for part in at)
        line_no = document.lines.get(at)
        if line_no is None or not _rewrite_line(lines, line_no, at[-1], name):
            add(
                at,
                'write this secret as a one-line string (key = "...") on a line of '
                "its own, so first boot can move it to a file",
            )
            continue
        secrets.append(_Secret(name, value))

    # A [secrets] table: each entry a file, the table turned into comments.
    table = document.data.get("secrets")
    if table is not None:
        header = document.lines.get(("secrets",))
        if not isinstance(table, dict) or header is None:
            add(("secrets",), 'expected a [secrets] table of name = "value"')
        elif not lines[header - 1].lstrip().startswith("[secrets]"):
            add(("secrets",), "write secrets as a [secrets] table of their own")
        else:
            _comment_out(lines, header, "[secrets] moved to secrets/ by first boot")
            for name, value in table.items():
                at = ("secrets", name)
                line_no = document.lines.get(at)
                if not isinstance(value, str) or not _SECRET_NAME.fullmatch(name):
                    add(
                        at,
                        'a secret is name = "value" (name of letters, digits, '
                        "'.', '_' or '-')",
                    )
                    continue
                if line_no is None or not _ONE_LINE_VALUE.match(
                    lines[line_no - 1].rstrip("\r\n")
                ):
                    add(at, 'write the secret as a one-line string (name = "...")')
                    continue
                _comment_out(lines, line_no, f"{name}: moved to secrets/{name}")
                secrets.append(_Secret(name, value))
    if problems:
        raise FirstBootError(sorted(problems, key=lambda p: p.line or 0), None)
    return "".join(lines), secrets


def _walk(value: Any, at: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Yield every (key path, value) in a parsed TOML document, depth first."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*at, key), item
            yield from _walk(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, dict):
                yield from _walk(item, (*at, index))


def _rewrite_line(lines: list[str], line_no: int, key: str, name: str) -> bool:
    """Rewrite ``key = "…"`` on line ``line_no`` as ``key_file = "secrets/name"``."""
    line = lines[line_no - 1]
    ending = line[len(line.rstrip("\r\n")) :]
    match = _ONE_LINE_VALUE.match(line.rstrip("\r\n"))
    if match is None:
        return False
    written = match.group("key")
    last = written.rsplit(".", 1)[-1].strip()
    if last.strip("\"'") != key:
        return False
    if written.endswith(('"', "'")):
        new_key = written[:-1] + "_file" + written[-1]
    else:
        new_key = written + "_file"
    lines[line_no - 1] = (
        f"{match.group('indent')}{new_key}{match.group('eq')}"
        f'"{SECRETS_DIR}/{name}"{match.group("rest")}{ending}'
    )
    return True


def _comment_out(lines: list[str], line_no: int, note: str) -> None:
    line = lines[line_no - 1]
    ending = line[len(line.rstrip("\r\n")) :] or "\n"
    lines[line_no - 1] = f"# {note}{ending}"


def _write_secrets(
    directory: Path, secrets: Sequence[_Secret], ids: tuple[int, int] | None
) -> None:
    """Write each secret to ``directory/<name>`` at mode 0600 (dir 0700)."""
    os.mkdir(directory, 0o700)
    for secret in secrets:
        path = directory / secret.name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secret.value.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if ids is not None:
            os.chown(path, *ids)
    if ids is not None:
        os.chown(directory, *ids)


# --- checks ---------------------------------------------------------------------------


def _relabel(
    problems: Sequence[SourceProblem], staged: Path, boot_file: Path
) -> list[SourceProblem]:
    """Name the installer's file, not the staged copy, in ``problems``."""
    return [
        SourceProblem(str(boot_file), p.line, p.key, p.message)
        if p.file == str(staged)
        else p
        for p in problems
    ]


def _data_dir_problem(
    boot_file: Path, text: str, configured: Path, service_dir: Path
) -> SourceProblem | None:
    """A ``data_dir`` set in the file must be the one the service may write."""
    document = parse_toml(text, str(boot_file))
    gateway = document.data.get("gateway")
    if not isinstance(gateway, dict) or "data_dir" not in gateway:
        return None
    if Path(configured).resolve() == Path(service_dir).resolve():
        return None
    return SourceProblem(
        str(boot_file),
        document.line_of(("gateway", "data_dir")),
        "gateway.data_dir",
        f"the service keeps its data in {service_dir} and may write nowhere else; "
        f'leave data_dir out or set it to "{service_dir}"',
    )


# --- writing --------------------------------------------------------------------------


def _commit(staging: Path, etc_dir: Path, ids: tuple[int, int] | None) -> Path:
    """Move the staged file and secrets into ``etc_dir``; return the site file."""
    secrets_dir = etc_dir / SECRETS_DIR
    old = etc_dir / (SECRETS_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if secrets_dir.exists():
        os.replace(secrets_dir, old)
    os.replace(staging / SECRETS_DIR, secrets_dir)
    site_file = etc_dir / SITE_FILE
    staged = staging / SITE_FILE
    os.chmod(staged, 0o640)
    if ids is not None:
        os.chown(staged, 0, ids[1])
    with open(staged, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staged, site_file)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(etc_dir)
    return site_file


def _write_boot_file(path: Path, text: str) -> None:
    """Write ``text`` to the boot partition (FAT) durably, with Windows line ends."""
    data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _shred(path: Path) -> None:
    """Overwrite ``path`` with zeros, then remove it.

    Best effort only: flash memory may keep old blocks; the installer should treat
    credentials that travelled on an SD card as exposed if the card leaves their hands.
    """
    with contextlib.suppress(OSError):
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
    path.unlink(missing_ok=True)


def write_error_report(boot_file: Path, problems: Sequence[SourceProblem]) -> Path:
    """Write ``ies-agent-error.txt`` beside ``boot_file``; return its path.

    Raises ``OSError`` when the boot partition cannot be written.
    """
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    count = len(problems)
    lines = [
        "IES edge agent: the site file was NOT imported",
        "",
        f"file: {boot_file}",
        f"when: {when}",
        "",
        f"{count} problem{'s' if count != 1 else ''} (file:line: key: what is wrong):",
        "",
        *(f"  {problem}" for problem in problems),
        "",
        "The agent was not started with this file. A gateway that was set up before",
        "keeps running its earlier configuration.",
        "",
        "What to do: correct the lines above (on a computer, `ies-agent config check",
        f"{BOOT_FILE}` shows the same list), copy the corrected file to the boot",
        f"partition as {BOOT_FILE} again and restart the gateway.",
        "",
    ]
    path = Path(boot_file).parent / ERROR_FILE
    _write_boot_file(path, "\n".join(lines))
    return path


def _reported(boot_file: Path, problems: Sequence[SourceProblem]) -> FirstBootError:
    """Write the error report for ``problems``; return the error to raise."""
    try:
        report: Path | None = write_error_report(boot_file, problems)
    except OSError:
        report = None
    return FirstBootError(problems, report)


# --- ownership ------------------------------------------------------------------------


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    """Return (uid, gid) of ``owner`` when running as root, else ``None``."""
    if owner is None or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _chown_tree(root: Path, ids: tuple[int, int]) -> None:
    """Give ``root`` and everything below it to ``ids`` (symlinks not followed)."""
    os.chown(root, *ids, follow_symlinks=False)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(Path(directory) / name, *ids, follow_symlinks=False)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
