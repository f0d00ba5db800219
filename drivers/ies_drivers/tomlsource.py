"""TOML files with line numbers, so a config error can say where it is.

``tomllib`` parses TOML into plain dicts and forgets where each key came from. This
module parses with ``tomllib`` (the authority on what is valid) and then scans the same
text once more to map every key path — ``devices[2].template``,
``blocks[0].points[3].type`` — to the line it is written on. The scanner understands
table headers ``[x]``, arrays of tables ``[[x]]`` (counting their elements, also
nested ones), dotted keys, quoted keys, multi-line strings and arrays, and inline
tables; where it cannot place a key, :meth:`TomlDocument.line_of` answers with the line
of the nearest enclosing table, which is still the right place to look.

It also holds the small tools both the template loader and the site loader use to
report problems: :class:`SourceProblem` (file, line, key, message) and
:class:`ProblemCollector`, which type-checks values and collects every problem instead
of stopping at the first.

Errors::

    TomlSourceError          base; ``path``, ``line`` (or None) and ``reason``
    ├── TomlReadError        the file is missing, unreadable or not UTF-8
    └── TomlSyntaxError      the text is not valid TOML
"""

from __future__ import annotations

import contextlib
import difflib
import re
import tomllib
from bisect import bisect_right
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KeyPath = tuple[str | int, ...]
"""A key path: table names and array indexes, e.g. ``("devices", 2, "template")``."""

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PATH_PART = re.compile(r'\[(\d+)\]|"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_-]+)')
_TOMLLIB_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


class TomlSourceError(ValueError):
    """Raised when a TOML file cannot be used; says which file and, if known, line."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class TomlReadError(TomlSourceError):
    """Raised when the file is missing, unreadable or not valid UTF-8."""


class TomlSyntaxError(TomlSourceError):
    """Raised when the text is not valid TOML; ``line`` is where the parser stopped."""


def format_key_path(path: Sequence[str | int]) -> str:
    """Return ``path`` as text: ``devices[2].template``; odd keys are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        name = part if _BARE_KEY.fullmatch(part) else '"' + _escape(part) + '"'
        text += f".{name}" if text else name
    return text


def parse_key_path(text: str) -> KeyPath:
    """Return the key path written as ``devices[2].template`` (inverse of format).

    Raises :class:`ValueError` for text that is not a key path.
    """
    parts: list[str | int] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "." and parts:
            pos += 1
        match = _PATH_PART.match(text, pos)
        if match is None:
            raise ValueError(f"not a key path: {text!r} (stuck at column {pos + 1})")
        index, quoted, bare = match.groups()
        if index is not None:
            parts.append(int(index))
        elif quoted is not None:
            parts.append(_unescape_basic(quoted))
        else:
            parts.append(bare)
        pos = match.end()
    return tuple(parts)


def did_you_mean(word: str, choices: Collection[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class TomlDocument:
    """A parsed TOML file and the line of every key in it.

    ``data`` is what ``tomllib`` returned; ``lines`` maps key paths to 1-based line
    numbers. ``path`` is kept as given, so messages show what the user typed.
    """

    path: str
    data: dict[str, Any]
    lines: Mapping[KeyPath, int] = field(repr=False)

    def line_of(self, path: str | Sequence[str | int]) -> int | None:
        """Return the line of ``path``, else of its nearest enclosing key or table.

        ``None`` when not even the top-level key appears in the file (for example a
        required table that is missing entirely).
        """
        parts = parse_key_path(path) if isinstance(path, str) else tuple(path)
        while parts:
            line = self.lines.get(parts)
            if line is not None:
                return line
            parts = parts[:-1]
        return None


def load_toml(path: str | Path) -> TomlDocument:
    """Read and parse the TOML file at ``path``.

    Raises :class:`TomlReadError` if the file cannot be read as UTF-8 text and
    :class:`TomlSyntaxError` (with the line ``tomllib`` stopped at) if it is not TOML.
    """
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TomlReadError(shown, None, "no such file") from None
    except IsADirectoryError:
        raise TomlReadError(
            shown, None, "is a directory, expected a TOML file"
        ) from None
    except UnicodeDecodeError as exc:
        raise TomlReadError(
            shown, None, f"not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise TomlReadError(shown, None, f"cannot read: {exc.strerror}") from None
    return parse_toml(text, shown)


def parse_toml(text: str, path: str = "<string>") -> TomlDocument:
    """Parse TOML ``text`` that came from ``path`` (used in messages only).

    Raises :class:`TomlSyntaxError` if the text is not TOML.
    """
    # Editors on Windows like to start UTF-8 files with a byte order mark.
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOMLLIB_POSITION.search(message)
        line = int(match.group(1)) if match else None
        reason = _TOMLLIB_POSITION.sub("", message).strip()
        if match:
            reason += f" (column {match.group(2)})"
        elif "(at end of document)" in message:
            line = text.count("\n") + (0 if text.endswith("\n") else 1)
            reason = message.replace("(at end of document)", "at the end").strip()
        raise TomlSyntaxError(path, line, f"not valid TOML: {reason}") from None
    return TomlDocument(path, data, locate_keys(text))


def locate_keys(text: str) -> dict[KeyPath, int]:
    """Return the 1-based line of every key path in TOML ``text``.

    Best effort on text ``tomllib`` accepted: if the scanner meets something it does
    not understand it stops and returns what it found so far.
    """
    scanner = _Scanner(text)
    with contextlib.suppress(IndexError, ValueError):
        scanner.run()
    return scanner.lines


# --- the scanner ---------------------------------------------------------------------


class _Scanner:
    """Walks TOML text once, recording where each key path starts."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        # Arrays of tables: resolved array path -> index of its current element.
        self._current: dict[KeyPath, int] = {}

    def line_at(self, pos: int) -> int:
        return bisect_right(self._line_starts, pos)

    def record(self, path: KeyPath, pos: int) -> None:
        self.lines.setdefault(path, self.line_at(pos))

    def run(self) -> None:
        table: KeyPath = ()
        text = self.text
        while True:
            self.skip_blank(newlines=True)
            if self.pos >= len(text):
                return
            start = self.pos
            if text.startswith("[[", start):
                self.pos += 2
                names = self.key()
                self.expect("]]")
                table = self.open_array_table(names, start)
            elif text[start] == "[":
                self.pos += 1
                names = self.key()
                self.expect("]")
                table = self.resolve(names)
                self.record_prefixes(table, start)
            else:
                names = self.key()
                self.expect("=")
                path = table + names
                self.record_prefixes(path, start)
                self.skip_blank()
                self.value(path)

    def resolve(self, names: Sequence[str]) -> KeyPath:
        """Turn header names into a path, inserting the current array-table indexes."""
        out: list[str | int] = []
        for name in names:
            out.append(name)
            index = self._current.get(tuple(out))
            if index is not None:
                out.append(index)
        return tuple(out)

    def open_array_table(self, names: Sequence[str], start: int) -> KeyPath:
        """Start the next element of the array of tables ``[[names]]``."""
        array = (*self.resolve(names[:-1]), names[-1])
        index = self._current.get(array, -1) + 1
        self._current[array] = index
        # Deeper arrays belonged to the previous element: forget their counters.
        for key in [k for k in self._current if len(k) > len(array)]:
            if key[: len(array)] == array:
                del self._current[key]
        self.record_prefixes(array, start)
        self.record((*array, index), start)
        return (*array, index)

    def record_prefixes(self, path: KeyPath, start: int) -> None:
        for end in range(1, len(path) + 1):
            self.record(path[:end], start)

    def key(self) -> tuple[str, ...]:
        """Read a (dotted, possibly quoted) key."""
        names: list[str] = []
        text = self.text
        while True:
            self.skip_blank()
            char = text[self.pos]
            if char in "\"'":
                start = self.pos
                self.string()
                raw = text[start + 1 : self.pos - 1]
                names.append(_unescape_basic(raw) if char == '"' else raw)
            else:
                match = _BARE_KEY.match(text, self.pos)
                if match is None:
                    raise ValueError(f"no key at {self.pos}")
                names.append(match.group())
                self.pos = match.end()
            self.skip_blank()
            if self.pos < len(text) and text[self.pos] == ".":
                self.pos += 1
                continue
            return tuple(names)

    def value(self, path: KeyPath) -> None:
        """Skip one value, recording array elements and inline-table keys."""
        char = self.text[self.pos]
        if char in "\"'":
            self.string()
        elif char == "[":
            self.array(path)
        elif char == "{":
            self.inline_table(path)
        else:
            while self.pos < len(self.text) and self.text[self.pos] not in ",]}#\r\n":
                self.pos += 1

    def array(self, path: KeyPath) -> None:
        self.pos += 1
        index = 0
        while True:
            self.skip_blank(newlines=True)
            if self.text[self.pos] == "]":
                self.pos += 1
                return
            self.record((*path, index), self.pos)
            self.value((*path, index))
            self.skip_blank(newlines=True)
            if self.text[self.pos] == ",":
                self.pos += 1
                index += 1

    def inline_table(self, path: KeyPath) -> None:
        self.pos += 1
        while True:
            self.skip_blank(newlines=True)
            if self.text[self.pos] == "}":
                self.pos += 1
                return
            start = self.pos
            inner = path + self.key()
            self.expect("=")
            self.record_prefixes(inner, start)
            self.skip_blank()
            self.value(inner)
            self.skip_blank(newlines=True)
            if self.text[self.pos] == ",":
                self.pos += 1

    def string(self) -> None:
        """Skip a basic, literal or multi-line string starting at ``pos``."""
        text = self.text
        quote = text[self.pos]
        if text.startswith(quote * 3, self.pos):
            self.pos += 3
            while not text.startswith(quote * 3, self.pos):
                self.pos += 2 if quote == '"' and text[self.pos] == "\\" else 1
                if self.pos >= len(text):
                    raise ValueError("unterminated string")
            self.pos += 3
            # Up to two quotes may sit right before the closing delimiter.
            while self.pos < len(text) and text[self.pos] == quote:
                self.pos += 1
            return
        self.pos += 1
        while text[self.pos] != quote:
            self.pos += 2 if quote == '"' and text[self.pos] == "\\" else 1
        self.pos += 1

    def expect(self, token: str) -> None:
        self.skip_blank()
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r} at {self.pos}")
        self.pos += len(token)

    def skip_blank(self, newlines: bool = False) -> None:
        """Skip spaces and tabs; with ``newlines`` also line ends and comments."""
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t" or (newlines and char in "\r\n"):
                self.pos += 1
            elif newlines and char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return


def _unescape_basic(raw: str) -> str:
    """Decode the escapes of a basic-string key (``"a\\"b"``); raw text on failure."""
    try:
        value = tomllib.loads(f'k = "{raw}"')["k"]
    except tomllib.TOMLDecodeError:
        return raw
    return str(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


# --- problems ------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceProblem:
    """One problem in a TOML file: where it is and what was expected there.

    ``str()`` gives ``file:line: key: message`` (``file: key: message`` when the line
    is unknown), the form editors and CI logs link to.
    """

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return (
            f"{where}: {self.key}: {self.message}"
            if self.key
            else (f"{where}: {self.message}")
        )


_MISSING = object()


class ProblemCollector:
    """Reads typed values out of a :class:`TomlDocument`, collecting every problem.

    Each getter takes the table that holds the key and the key's full path; it returns
    the value if it is of the expected kind, else records a problem and returns
    ``None`` (or the default when the key is absent and not required).
    """

    def __init__(self, document: TomlDocument) -> None:
        self.document = document
        self.problems: list[SourceProblem] = []

    def add(self, path: Sequence[str | int], message: str) -> None:
        """Record ``message`` about the key at ``path``."""
        self.problems.append(
            SourceProblem(
                self.document.path,
                self.document.line_of(path),
                format_key_path(path),
                message,
            )
        )

    def unknown_keys(
        self, table: Mapping[str, Any], allowed: Collection[str], path: KeyPath
    ) -> None:
        """Record each key of ``table`` not in ``allowed``, with a did-you-mean hint."""
        for key in table:
            if key not in allowed:
                self.add(
                    (*path, key),
                    f"unknown key{did_you_mean(key, allowed)}; "
                    f"allowed here: {', '.join(sorted(allowed))}",
                )

    def _get(
        self, table: Mapping[str, Any], path: KeyPath, required: bool, what: str
    ) -> Any:
        key = path[-1]
        assert isinstance(key, str)
        if key in table:
            return table[key]
        if required:
            self.add(path, f"missing, expected {what}")
        return _MISSING

    def table(
        self, parent: Mapping[str, Any], path: KeyPath, *, required: bool = False
    ) -> dict[str, Any] | None:
        """Return the table at ``path`` (``None`` if absent or not a table)."""
        value = self._get(parent, path, required, "a table")
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            self.add(path, f"expected a table, got {_kind(value)}")
            return None
        return value

    def tables(
        self, parent: Mapping[str, Any], path: KeyPath, *, required: bool = False
    ) -> list[dict[str, Any]]:
        """Return the array of tables at ``path`` (``[[name]]``); ``[]`` if absent."""
        value = self._get(parent, path, required, f"one or more [[{path[-1]}]] tables")
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.add(path, f"expected [[{path[-1]}]] tables, got {_kind(value)}")
            return []
        return value

    def string(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        *,
        required: bool = False,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        pattern_text: str = "",
    ) -> str | None:
        """Return the string at ``path``; ``pattern`` (if given) must match fully."""
        value = self._get(table, path, required, "a string")
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.add(path, f"expected a string, got {_kind(value)}")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.add(path, f"{value!r} is not {pattern_text}")
            return None
        return value

    def choice(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        choices: Sequence[str],
        *,
        required: bool = False,
        default: str | None = None,
    ) -> str | None:
        """Return the string at ``path`` if it is one of ``choices``."""
        value = self._get(table, path, required, "one of " + ", ".join(choices))
        if value is _MISSING:
            return default
        if not isinstance(value, str) or value not in choices:
            shown = repr(value) if isinstance(value, str) else _kind(value)
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            self.add(path, f"{shown} is not one of {', '.join(choices)}{hint}")
            return None
        return value

    def integer(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        *,
        required: bool = False,
        default: int | None = None,
        low: int | None = None,
        high: int | None = None,
    ) -> int | None:
        """Return the integer at ``path``, checked against ``low``..``high``."""
        value = self._get(table, path, required, _range_text("an integer", low, high))
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"expected an integer, got {_kind(value)}")
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            self.add(
                path, f"{value} is out of range, expected {_range_text('', low, high)}"
            )
            return None
        return value

    def number(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        *,
        required: bool = False,
        default: float | None = None,
        low: float | None = None,
        high: float | None = None,
        low_exclusive: bool = False,
    ) -> float | None:
        """Return the number (integer or float) at ``path``, checked for range."""
        value = self._get(table, path, required, _range_text("a number", low, high))
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(path, f"expected a number, got {_kind(value)}")
            return None
        number = float(value)
        too_low = low is not None and (number <= low if low_exclusive else number < low)
        if too_low or (high is not None and number > high):
            bound = f"more than {low:g}" if low_exclusive and low is not None else ""
            if bound and high is not None:
                bound += f" and at most {high:g}"
            expected = bound or _range_text("", low, high)
            self.add(path, f"{value} is out of range, expected {expected}")
            return None
        return number

    def boolean(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        *,
        required: bool = False,
        default: bool | None = None,
    ) -> bool | None:
        """Return the boolean at ``path`` (``true``/``false``, not a string)."""
        value = self._get(table, path, required, "true or false")
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.add(path, f"expected true or false, got {_kind(value)}")
            return None
        return value

    def string_list(self, table: Mapping[str, Any], path: KeyPath) -> list[str] | None:
        """Return the list of strings at ``path`` (``[]`` if absent)."""
        value = self._get(table, path, False, "a list of strings")
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.add(path, f"expected a list of strings, got {_kind(value)}")
            return None
        return value


def _kind(value: object) -> str:
    """Name a TOML value's kind for a message: ``a string ('x')``, ``a table``."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _range_text(noun: str, low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        span = f"{low:g}..{high:g}"
    elif low is not None:
        span = f">= {low:g}"
    elif high is not None:
        span = f"<= {high:g}"
    else:
        return noun
    return f"{noun} {span}".strip()
