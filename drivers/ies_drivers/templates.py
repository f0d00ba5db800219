"""Device templates: one TOML file per device model, turned into a DeviceTemplate.

A template describes a model as data (register address, function, type, word order,
scale, unit, OBIS code, the raw value that means "not implemented"), so supporting a
new meter means writing a file and a test vector, not code. The format is documented
in ``configs/README.md``; in short::

    [template]
    id = "eastron-sdm630"            # equals the file name without .toml
    manufacturer = "Eastron"
    model = "SDM630-Modbus"
    kind = "meter"
    protocol = "modbus"
    source = "vendor document, version, URL"

    [[blocks]]                        # points sharing a function and word order
    function = "input"                # holding (FC 3) or input (FC 4)
    order = "ABCD"

    [[blocks.points]]
    name = "voltage_l1"
    address = 0                       # protocol address, 0-based
    type = "f32"
    unit = "V"
    obis = "1-0:32.7.0"

SunSpec devices (``sunspec = true`` in ``[template]``) carry no points: they are found
by walking the model chain at run time. Their ``[sunspec]`` table is kept on
:class:`TemplateFile` for the discovery code.

Templates are looked up by id in the site's own template directories first, then in
the shipped ``configs/devices`` (see :func:`shipped_configs_dir`).

Errors (all :class:`~ies_drivers.errors.TemplateError`)::

    TemplateError
    ├── TemplateNotFoundError    no file for this template id; ``known`` lists the ids
    └── InvalidTemplateError     the file is not a valid template; ``problems`` lists
                                 every problem with file, line and key
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from ies_drivers.errors import TemplateError
from ies_drivers.modbus.model import (
    DeviceTemplate,
    PointSpec,
    PointType,
    RegisterFunction,
    WordOrder,
)
from ies_drivers.tomlsource import (
    KeyPath,
    ProblemCollector,
    SourceProblem,
    TomlSourceError,
    did_you_mean,
    load_toml,
)

TEMPLATE_KINDS = ("meter", "inverter", "battery", "charger", "sensor", "relay")
"""What a device template may describe (``[template] kind``)."""

SUNSPEC_BASE_ADDRESSES = (40000, 0, 50000)
"""Where SunSpec devices put their ``SunS`` marker, in the order tried by default."""

MAX_BLOCK = 125
"""Most registers one Modbus read may ask for (FC 3/4)."""

_TOP_KEYS = {"template", "blocks", "sunspec"}
_TEMPLATE_KEYS = {
    "id",
    "manufacturer",
    "model",
    "kind",
    "protocol",
    "source",
    "max_block",
    "quirks",
    "sunspec",
    "description",
}
_BLOCK_KEYS = {"function", "order", "points", "description"}
_POINT_KEYS = {
    "name",
    "address",
    "type",
    "length",
    "unit",
    "obis",
    "scale",
    "scale_factor",
    "not_implemented",
    "cumulative",
    "description",
}
_SUNSPEC_KEYS = {"models", "base_addresses", "max_models"}
_FUNCTIONS = ("holding", "input")
_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
_TYPES = tuple(t.value for t in PointType)
_NOT_NUMBERS = {
    PointType.STRING,
    PointType.ENUM16,
    PointType.ENUM32,
    PointType.BITFIELD16,
    PointType.BITFIELD32,
}
_SIGNED = {PointType.S16, PointType.S32, PointType.S64, PointType.SUNSSF}
# Spellings other tools use for our types, so the error can name ours.
_TYPE_ALIASES = {
    "uint16": "u16",
    "int16": "s16",
    "uint32": "u32",
    "int32": "s32",
    "uint64": "u64",
    "int64": "s64",
    "float": "f32",
    "float32": "f32",
    "float64": "f64",
    "double": "f64",
    "str": "string",
    "ascii": "string",
    "i16": "s16",
    "i32": "s32",
    "i64": "s64",
}

_TEMPLATE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_POINT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_QUIRK = re.compile(r"[a-z][a-z0-9_]{0,63}")
_OBIS = re.compile(
    r"(\d{1,3})-(\d{1,3}):(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:\*(\d{1,3}))?"
)


class TemplateNotFoundError(TemplateError):
    """Raised when no template file has the requested id.

    ``name`` is the id asked for, ``known`` every id available in the searched
    directories, ``searched`` those directories.
    """

    def __init__(self, name: str, known: Sequence[str], searched: Sequence[Path]):
        self.name = name
        self.known = tuple(known)
        self.searched = tuple(searched)
        hint = did_you_mean(name, known)
        listing = ", ".join(known) if known else "none"
        super().__init__(f"no template '{name}'{hint} (known: {listing})")


class InvalidTemplateError(TemplateError):
    """Raised when a template file is not a valid template.

    ``problems`` holds every problem found, each with the file, line and key.
    ``str()`` prints one problem per line.
    """

    def __init__(self, problems: Sequence[SourceProblem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class TemplateFile:
    """A loaded template and what the file says beyond :class:`DeviceTemplate`.

    ``sunspec`` is the file's ``[sunspec]`` table (read-only; empty for plain Modbus
    templates): settings the SunSpec discovery uses, such as the base addresses to
    probe or the models to read.
    """

    path: Path
    template: DeviceTemplate
    sunspec: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def sunspec_models(self) -> tuple[int, ...]:
        """SunSpec model ids to read (``[sunspec] models``); empty = every model."""
        return tuple(self.sunspec.get("models", ()))

    @property
    def sunspec_bases(self) -> tuple[int, ...]:
        """Protocol addresses to probe for the ``SunS`` marker, in order."""
        return tuple(self.sunspec.get("base_addresses", SUNSPEC_BASE_ADDRESSES))


# --- finding templates ---------------------------------------------------------------


def shipped_configs_dir() -> Path:
    """Return the ``configs`` directory shipped with the agent.

    In an installed wheel it sits beside this package as ``ies_agent/_configs``
    (``pyproject.toml`` force-includes it there); in an editable install it is the
    repository's ``configs``. Found by location, so ``ies_drivers`` never imports
    ``ies_agent``. Raises :class:`TemplateError` when neither exists.
    """
    package = Path(__file__).resolve().parent
    candidates = (
        package.parent / "ies_agent" / "_configs",
        package.parent.parent / "configs",
    )
    for candidate in candidates:
        if (candidate / "devices").is_dir():
            return candidate
    looked = " and ".join(str(c) for c in candidates)
    raise TemplateError(f"shipped device templates not found: looked in {looked}")


def shipped_templates_dir() -> Path:
    """Return the directory of shipped device templates (``configs/devices``)."""
    return shipped_configs_dir() / "devices"


def template_search_path(search_dirs: Iterable[str | Path] = ()) -> list[Path]:
    """Return ``search_dirs`` followed by the shipped templates directory.

    The site's own directories come first so a site can override a shipped model.
    Directories that do not exist are skipped; the shipped one is skipped too if this
    is a checkout without ``configs`` (then only ``search_dirs`` count).
    """
    dirs = [Path(d) for d in search_dirs]
    try:
        shipped = shipped_templates_dir()
    except TemplateError:
        shipped = None
    if shipped is not None and not any(_same_dir(shipped, d) for d in dirs):
        dirs.append(shipped)
    return [d for d in dirs if d.is_dir()]


def list_templates(search_dirs: Iterable[str | Path] = ()) -> list[str]:
    """Return the sorted ids of the templates in ``search_dirs`` and the shipped dir."""
    names = {
        path.stem
        for directory in template_search_path(search_dirs)
        for path in directory.glob("*.toml")
        if _TEMPLATE_ID.fullmatch(path.stem)
    }
    return sorted(names)


def find_template_file(
    name: str, search_dirs: Iterable[str | Path] = ()
) -> TemplateFile:
    """Load the template with id ``name`` from the first directory that has it.

    Searches ``search_dirs`` in order, then the shipped ``configs/devices``. Raises
    :class:`TemplateNotFoundError` (with the known ids) if none has it and
    :class:`InvalidTemplateError` if the file found is not a valid template.
    """
    dirs = template_search_path(search_dirs)
    if _TEMPLATE_ID.fullmatch(name):
        for directory in dirs:
            candidate = directory / f"{name}.toml"
            if candidate.is_file():
                return load_template_file(candidate)
    raise TemplateNotFoundError(name, list_templates(dirs), dirs)


def find_template(name: str, search_dirs: Iterable[str | Path] = ()) -> DeviceTemplate:
    """Return the :class:`DeviceTemplate` with id ``name``; see find_template_file."""
    return find_template_file(name, search_dirs).template


def load_template(path: str | Path) -> DeviceTemplate:
    """Load the template file at ``path``; see :func:`load_template_file`."""
    return load_template_file(path).template


def load_template_file(path: str | Path) -> TemplateFile:
    """Load and validate the template file at ``path``.

    Raises :class:`InvalidTemplateError` listing every problem (unreadable file, bad
    TOML, unknown keys, unknown types, overlapping points, bad OBIS codes, scale
    factors naming no ``sunssf`` point, ...), each with file, line and key.
    """
    try:
        document = load_toml(path)
    except TomlSourceError as exc:
        raise InvalidTemplateError(
            [SourceProblem(exc.path, exc.line, "", exc.reason)]
        ) from None
    check = ProblemCollector(document)
    result = _TemplateReader(check, Path(path)).read(document.data)
    if check.problems or result is None:
        raise InvalidTemplateError(check.problems)
    return result


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


# --- reading one template ------------------------------------------------------------


class _TemplateReader:
    """Turns the parsed TOML of one template into a :class:`TemplateFile`."""

    def __init__(self, check: ProblemCollector, path: Path) -> None:
        self.check = check
        self.path = path

    def read(self, data: dict[str, Any]) -> TemplateFile | None:
        check = self.check
        check.unknown_keys(data, _TOP_KEYS, ())
        head = check.table(data, ("template",), required=True)
        if head is None:
            return None

        # The [template] table: identity, provenance, read limits.
        check.unknown_keys(head, _TEMPLATE_KEYS, ("template",))
        at = ("template",)
        template_id = check.string(
            head,
            (*at, "id"),
            required=True,
            pattern=_TEMPLATE_ID,
            pattern_text="a template id (lower-case letters, digits, '.', '_', '-')",
        )
        if template_id is not None and template_id != self.path.stem:
            check.add(
                (*at, "id"),
                f"'{template_id}' must equal the file name without .toml "
                f"('{self.path.stem}'), so sites can find it by id",
            )
        manufacturer = check.string(head, (*at, "manufacturer"), required=True)
        model = check.string(head, (*at, "model"), required=True)
        kind = check.choice(head, (*at, "kind"), TEMPLATE_KINDS, required=True)
        check.choice(head, (*at, "protocol"), ("modbus",), required=True)
        source = check.string(head, (*at, "source"), required=True)
        if source is not None and not source.strip():
            check.add((*at, "source"), "must name where the register map comes from")
        max_block = check.integer(
            head, (*at, "max_block"), default=MAX_BLOCK, low=1, high=MAX_BLOCK
        )
        quirks = check.string_list(head, (*at, "quirks")) or []
        for index, quirk in enumerate(quirks):
            if not _QUIRK.fullmatch(quirk):
                check.add(
                    (*at, "quirks", index),
                    f"{quirk!r} is not a quirk flag name (lower_case_with_underscores)",
                )
        check.string(head, (*at, "description"))
        sunspec = bool(check.boolean(head, (*at, "sunspec"), default=False))

        # Points: from [[blocks]] for plain Modbus, none for SunSpec.
        sunspec_table = check.table(data, ("sunspec",))
        if sunspec:
            if sunspec_table is None and "sunspec" not in data:
                check.add(
                    (*at, "sunspec"),
                    "sunspec = true needs a [sunspec] table naming the models to read",
                )
            if "blocks" in data:
                check.add(
                    ("blocks",),
                    "a SunSpec template has no [[blocks]]: its points come from the "
                    "device's model chain",
                )
            if sunspec_table is not None:
                self.read_sunspec(sunspec_table)
            points: tuple[PointSpec, ...] = ()
        else:
            if "sunspec" in data:
                check.add(("sunspec",), "[sunspec] needs sunspec = true in [template]")
            points = self.read_blocks(data, max_block or MAX_BLOCK)

        if (
            template_id is None
            or manufacturer is None
            or model is None
            or kind is None
            or source is None
        ):
            return None
        template = DeviceTemplate(
            id=template_id,
            manufacturer=manufacturer,
            model=model,
            kind=kind,
            points=points,
            sunspec=sunspec,
            max_block=max_block or MAX_BLOCK,
            quirks=frozenset(quirks),
            source=source,
        )
        frozen = MappingProxyType(dict(sunspec_table or {}))
        return TemplateFile(self.path, template, frozen)

    def read_sunspec(self, table: dict[str, Any]) -> None:
        """Check the ``[sunspec]`` table: which models to read, where the marker is."""
        check = self.check
        at: KeyPath = ("sunspec",)
        check.unknown_keys(table, _SUNSPEC_KEYS, at)
        for key, low, high, required in (
            ("models", 1, 0xFFFE, True),
            ("base_addresses", 0, 0xFFFD, False),
        ):
            if key not in table:
                if required:
                    check.add((*at, key), "missing, expected a list of model ids")
                continue
            values = table[key]
            if not isinstance(values, list) or not values:
                check.add(
                    (*at, key), f"expected a non-empty list of integers {low}..{high}"
                )
                continue
            for index, value in enumerate(values):
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int)
                    or not low <= value <= high
                ):
                    check.add(
                        (*at, key, index), f"{value!r} is not an integer {low}..{high}"
                    )
        check.integer(table, (*at, "max_models"), low=1, high=1000)

    def read_blocks(
        self, data: dict[str, Any], max_block: int
    ) -> tuple[PointSpec, ...]:
        check = self.check
        blocks = check.tables(data, ("blocks",), required=True)
        points: list[tuple[KeyPath, PointSpec]] = []
        for b, block in enumerate(blocks):
            at: KeyPath = ("blocks", b)
            check.unknown_keys(block, _BLOCK_KEYS, at)
            function = check.choice(block, (*at, "function"), _FUNCTIONS, required=True)
            order = check.choice(block, (*at, "order"), _ORDERS, default="ABCD")
            check.string(block, (*at, "description"))
            entries = check.tables(block, (*at, "points"), required=True)
            if "points" in block and not entries and isinstance(block["points"], list):
                check.add((*at, "points"), "a block needs at least one point")
            for p, entry in enumerate(entries):
                spec = self.read_point(
                    entry,
                    (*at, "points", p),
                    cast(RegisterFunction, function or "holding"),
                    cast(WordOrder, order or "ABCD"),
                    max_block,
                )
                if spec is not None:
                    points.append(((*at, "points", p), spec))
        self.check_together(points)
        return tuple(spec for _, spec in points)

    def read_point(
        self,
        entry: dict[str, Any],
        at: KeyPath,
        function: RegisterFunction,
        order: WordOrder,
        max_block: int,
    ) -> PointSpec | None:
        check = self.check
        check.unknown_keys(entry, _POINT_KEYS, at)
        name = check.string(
            entry,
            (*at, "name"),
            required=True,
            pattern=_POINT_NAME,
            pattern_text="a point name (a letter, then letters, digits or '_')",
        )
        address = check.integer(
            entry, (*at, "address"), required=True, low=0, high=65535
        )
        point_type = self.read_type(entry, (*at, "type"))

        # Length: strings only, and a string must have one.
        length = 0
        if point_type is PointType.STRING:
            length = (
                check.integer(
                    entry, (*at, "length"), required=True, low=1, high=max_block
                )
                or 0
            )
        elif "length" in entry:
            check.add(
                (*at, "length"),
                "length applies to string points only (other types have a fixed size)",
            )

        unit = check.string(entry, (*at, "unit"), default="") or ""
        description = check.string(entry, (*at, "description"), default="") or ""
        obis = self.read_obis(entry, (*at, "obis"))
        scale = self.read_scale(entry, (*at, "scale"))
        scale_factor = check.string(entry, (*at, "scale_factor"))
        cumulative = bool(check.boolean(entry, (*at, "cumulative"), default=False))
        not_implemented = self.read_not_implemented(entry, at, point_type, length)

        if point_type in _NOT_NUMBERS:
            for key, present in (
                ("scale", "scale" in entry),
                ("scale_factor", scale_factor is not None),
                ("cumulative", cumulative),
            ):
                if present:
                    check.add(
                        (*at, key),
                        f"{key} applies to numeric points, not {point_type.value}",
                    )
        if address is not None and point_type is not None:
            count = length if point_type is PointType.STRING else point_type.registers
            if count and address + count > 65536:
                check.add(
                    (*at, "address"),
                    f"{point_type.value} at {address} runs past register 65535",
                )
        if name is None or address is None or point_type is None or scale is None:
            return None
        if point_type is PointType.STRING and not length:
            return None
        return PointSpec(
            name=name,
            address=address,
            type=point_type,
            function=function,
            order=order,
            length=length,
            unit=unit,
            obis=obis,
            scale=scale,
            scale_factor=scale_factor,
            not_implemented=not_implemented,
            cumulative=cumulative,
            description=description,
        )

    def read_type(self, entry: dict[str, Any], at: KeyPath) -> PointType | None:
        value = entry.get("type")
        if "type" not in entry:
            self.check.add(at, f"missing, expected one of {', '.join(_TYPES)}")
            return None
        if not isinstance(value, str) or value not in _TYPES:
            shown = repr(value) if isinstance(value, str) else "a non-string"
            alias = _TYPE_ALIASES.get(value.lower()) if isinstance(value, str) else None
            hint = (
                f" (did you mean '{alias}'?)"
                if alias
                else did_you_mean(value, _TYPES)
                if isinstance(value, str)
                else ""
            )
            self.check.add(
                at, f"unknown type {shown}{hint}; expected one of {', '.join(_TYPES)}"
            )
            return None
        return PointType(value)

    def read_obis(self, entry: dict[str, Any], at: KeyPath) -> str | None:
        value = self.check.string(entry, at)
        if value is None:
            return None
        match = _OBIS.fullmatch(value)
        if match is None or any(
            int(group) > 255 for group in match.groups() if group is not None
        ):
            self.check.add(
                at,
                f"bad OBIS code {value!r}: expected A-B:C.D.E or A-B:C.D.E*F with "
                "each group 0-255, e.g. 1-0:1.8.0",
            )
            return None
        # One spelling project-wide: the F group is written, 255 when not given.
        return value if match.group(6) is not None else value + "*255"

    def read_scale(self, entry: dict[str, Any], at: KeyPath) -> Decimal | None:
        if "scale" not in entry:
            return Decimal(1)
        value = entry["scale"]
        if isinstance(value, float):
            self.check.add(
                at,
                f'write the scale as a decimal string, e.g. scale = "{value!r}": '
                "a TOML float is inexact",
            )
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.check.add(at, 'expected a decimal string such as "0.01"')
            return None
        try:
            scale = Decimal(value)
        except InvalidOperation:
            self.check.add(at, f'{value!r} is not a decimal number such as "0.01"')
            return None
        if not scale.is_finite() or scale == 0:
            self.check.add(at, f"{value!r} must be a finite, non-zero decimal")
            return None
        return scale

    def read_not_implemented(
        self,
        entry: dict[str, Any],
        at: KeyPath,
        point_type: PointType | None,
        length: int,
    ) -> int | None:
        """Return the raw "not implemented" value as the unsigned register content."""
        key = (*at, "not_implemented")
        value = self.check.integer(entry, key)
        if value is None or point_type is None:
            return None
        if point_type is PointType.STRING:
            self.check.add(key, "an empty string already means not implemented")
            return None
        bits = 16 * point_type.registers
        low = -(1 << (bits - 1)) if point_type in _SIGNED else 0
        if not low <= value < (1 << bits):
            self.check.add(
                key,
                f"{value} does not fit a {point_type.value} "
                f"(expected {low}..{(1 << bits) - 1}, hex like 0x8000 is fine)",
            )
            return None
        return value & ((1 << bits) - 1)

    def check_together(self, points: list[tuple[KeyPath, PointSpec]]) -> None:
        """Check what involves several points: names, overlaps, scale factors."""
        check = self.check

        # Names are unique across the template.
        seen: dict[str, KeyPath] = {}
        for at, spec in points:
            if spec.name in seen:
                check.add(
                    (*at, "name"),
                    f"'{spec.name}' is already the name of the point at line "
                    f"{check.document.line_of(seen[spec.name])}",
                )
            else:
                seen[spec.name] = (*at, "name")

        # Points of the same register table must not share registers.
        for function in _FUNCTIONS:
            same = sorted(
                ((at, s) for at, s in points if s.function == function),
                key=lambda item: (item[1].address, item[1].end),
            )
            for (_, before), (at, after) in itertools.pairwise(same):
                if after.address < before.end:
                    check.add(
                        (*at, "address"),
                        f"'{after.name}' (registers {after.address}-{after.end - 1}) "
                        f"overlaps '{before.name}' (registers {before.address}-"
                        f"{before.end - 1}) in the {function} registers",
                    )

        # Scale factors name a sunssf point of this template.
        sunssf = {s.name for _, s in points if s.type is PointType.SUNSSF}
        for at, spec in points:
            if spec.scale_factor is not None and spec.scale_factor not in sunssf:
                known = ", ".join(sorted(sunssf)) or "none in this template"
                check.add(
                    (*at, "scale_factor"),
                    f"'{spec.scale_factor}' names no sunssf point "
                    f"(sunssf points: {known})",
                )
