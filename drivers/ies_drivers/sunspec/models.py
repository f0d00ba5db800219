"""SunSpec model definitions: which point sits at which register of a model.

The definitions come from the JSON model files the SunSpec Alliance publishes, as
shipped inside the ``pysunspec2`` distribution
(``sunspec2/models/json/model_<id>.json``). Only the JSON files are read;
pysunspec2's Python modules are never imported, so the agent's footprint stays small.
Each model is parsed once, on first use, and kept.

Layout rules used here (SunSpec information model):

- A model starts with a two-register header, ``ID`` and ``L``; ``L`` counts the
  registers after the header. Offsets below count from the ``ID`` register, so a point
  at offset ``n`` of a model whose header sits at address ``a`` is read at ``a + n``.
- A group's own points come first, then its sub-groups in order. A sub-group without a
  ``count`` occurs once and is part of the fixed block (model 704's ``PFWInj``).
- A sub-group with a ``count`` (``0`` = as many as fit in ``L``, or the name of a count
  point) repeats. One trailing repeating group of fixed size (model 160's ``module``,
  711's ``Ctl``) is decoded instance by instance, named ``module[1].DCA``; groups whose
  size depends on nested repeats (the curves of 705-712) are listed in
  :attr:`ModelDef.undecoded` and their registers are left alone.
- A point's scale factor is a ``sunssf`` point looked up in the point's own group first,
  then in the enclosing groups; a few models give a fixed power of ten instead.

Errors (both are :class:`~ies_drivers.errors.TemplateError`, the model file is the
template of a SunSpec model)::

    TemplateError
    └── ModelDefinitionError     a model file is unreadable or describes no valid layout
        └── UnknownModelError    no definition is shipped for this model id
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ies_drivers.errors import TemplateError
from ies_drivers.modbus.model import PointType

HEADER_REGISTERS = 2
"""Registers of a model header: ``ID`` then ``L``."""


class ModelDefinitionError(TemplateError):
    """Raised when a SunSpec model file cannot be read or describes no valid layout."""


class UnknownModelError(ModelDefinitionError):
    """Raised when no definition is shipped for a SunSpec model id.

    ``model_id`` is the id asked for. Vendor models (64000 and up) usually have none;
    discovery still walks past them.
    """

    def __init__(self, model_id: int, detail: str = "") -> None:
        self.model_id = model_id
        super().__init__(
            f"no SunSpec definition for model {model_id}"
            + (f" ({detail})" if detail else "")
            + ": it is a vendor model or newer than the installed pysunspec2"
        )


# SunSpec point type -> (our register type, extra raw value meaning "not implemented").
# None as register type: the point is skipped (padding, network addresses).
_TYPES: dict[str, tuple[PointType | None, int | None]] = {
    "int16": (PointType.S16, None),
    "uint16": (PointType.U16, None),
    "count": (PointType.U16, None),
    "acc16": (PointType.U16, 0),
    "enum16": (PointType.ENUM16, None),
    "bitfield16": (PointType.BITFIELD16, None),
    "sunssf": (PointType.SUNSSF, None),
    "int32": (PointType.S32, None),
    "uint32": (PointType.U32, None),
    "acc32": (PointType.ACC32, None),
    "enum32": (PointType.ENUM32, None),
    "bitfield32": (PointType.BITFIELD32, None),
    "float32": (PointType.F32, 0x7FC00000),
    "int64": (PointType.S64, None),
    "uint64": (PointType.U64, None),
    "acc64": (PointType.ACC64, None),
    "float64": (PointType.F64, 0x7FF8000000000000),
    "string": (PointType.STRING, None),
    "pad": (None, None),
    "ipaddr": (None, None),
    "ipv6addr": (None, None),
    "eui48": (None, None),
}


@dataclass(frozen=True, slots=True)
class ModelPoint:
    """One point of a model definition.

    ``name`` is the point's path inside the model: ``"W"``, ``"PFWInj.PF"`` for a point
    of a non-repeating sub-group, ``"module.DCA"`` for a point of the repeating group.
    ``offset`` counts registers from the model's ``ID`` register (for points of the
    repeating group: from the start of the instance). ``type`` is ``None`` for points
    that carry no value for us (``pad``, network addresses). ``scale_factor`` is the
    path of the ``sunssf`` point that scales this one, or a fixed power of ten.
    ``not_implemented`` is a raw value meaning "no value" on top of the type's own
    SunSpec sentinel (quiet NaN for floats, 0 for ``acc16``).
    """

    name: str
    offset: int
    size: int
    sunspec_type: str
    type: PointType | None
    scale_factor: str | int | None = None
    units: str = ""
    label: str = ""
    mandatory: bool = False
    not_implemented: int | None = None


@dataclass(frozen=True, slots=True)
class RepeatingGroup:
    """The trailing repeating group of a model, of a fixed size per instance.

    ``offset`` is where the first instance starts, counted from the model's ``ID``
    register; ``length`` the registers of one instance; ``count`` is ``0`` when the
    instances fill the model up to ``L``, else the name of the point holding their
    number (the device's ``L`` still bounds them).
    """

    name: str
    offset: int
    length: int
    count: int | str
    points: tuple[ModelPoint, ...]


@dataclass(frozen=True, slots=True)
class PlacedPoint:
    """A point at its place in one model instance of a given length.

    ``name`` is unique in the model (``"W"``, ``"module[2].DCA"``, 1-based instances);
    ``key`` is the same without instance numbers (``"module.DCA"``), used to look the
    point up in maps; ``offset`` counts from the model's ``ID`` register;
    ``scale_factor`` is the instance-qualified name of the scaling point or a fixed
    power of ten.
    """

    name: str
    key: str
    offset: int
    point: ModelPoint
    scale_factor: str | int | None


@dataclass(frozen=True, slots=True)
class ModelDef:
    """A parsed SunSpec model: its fixed block and its repeating group, if any.

    ``length`` is the fixed block's register count after the header (the ``L`` of a
    device with no repeating instances); ``points`` the fixed-block points without the
    ``ID``/``L`` header; ``undecoded`` names sub-groups left alone because their size
    depends on nested counts.
    """

    id: int
    name: str
    label: str
    length: int
    points: tuple[ModelPoint, ...]
    repeating: RepeatingGroup | None = None
    undecoded: tuple[str, ...] = ()

    def point(self, name: str) -> ModelPoint:
        """Return the fixed-block point called ``name``; raise ``KeyError`` if none."""
        for p in self.points:
            if p.name == name:
                return p
        if self.repeating is not None:
            for p in self.repeating.points:
                if p.name == name:
                    return p
        raise KeyError(name)

    def instances(self, length: int) -> int:
        """Return how many repeating-group instances fit in a model with this ``L``."""
        if self.repeating is None or self.repeating.length <= 0:
            return 0
        room = HEADER_REGISTERS + length - self.repeating.offset
        return max(0, room // self.repeating.length)

    def layout(
        self, length: int | None = None, *, padding: bool = False
    ) -> tuple[PlacedPoint, ...]:
        """Return every value-carrying point of a model instance with ``L = length``.

        ``length`` defaults to the fixed block's length. Points that do not lie wholly
        inside the model (a device may implement an older, shorter revision, as the
        SolarEdge meter's model 1 with ``L = 65`` does) are left out, and so are points
        without a value type (padding) unless ``padding`` is true.
        """
        size = self.length if length is None else length
        end = HEADER_REGISTERS + size
        placed = [
            PlacedPoint(p.name, p.name, p.offset, p, p.scale_factor)
            for p in self.points
            if (padding or p.type is not None) and p.offset + p.size <= end
        ]
        group = self.repeating
        if group is not None:
            for index in range(1, self.instances(size) + 1):
                start = group.offset + (index - 1) * group.length
                prefix = f"{group.name}[{index}]"
                for p in group.points:
                    if p.type is None and not padding:
                        continue
                    if start + p.offset + p.size > end:
                        continue
                    name = prefix + p.name[len(group.name) :]
                    sf = p.scale_factor
                    if isinstance(sf, str) and sf.startswith(group.name + "."):
                        sf = prefix + sf[len(group.name) :]
                    placed.append(PlacedPoint(name, p.name, start + p.offset, p, sf))
        return tuple(placed)


@functools.lru_cache(maxsize=64)
def model_definition(model_id: int) -> ModelDef:
    """Return the definition of SunSpec model ``model_id``, parsed once and kept.

    Raises :class:`UnknownModelError` when no model file exists for the id, and
    :class:`ModelDefinitionError` when the file is not a valid model.
    """
    if not 1 <= model_id <= 0xFFFE:
        raise UnknownModelError(model_id, "not a model id")
    try:
        folder = resources.files("sunspec2").joinpath("models", "json")
    except ModuleNotFoundError as exc:
        raise ModelDefinitionError(
            "SunSpec model files not found: install the pysunspec2 package"
        ) from exc
    entry = folder.joinpath(f"model_{model_id}.json")
    try:
        text = entry.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnknownModelError(model_id) from None
    except OSError as exc:
        raise ModelDefinitionError(f"cannot read {entry}: {exc}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ModelDefinitionError(f"{entry} is not valid JSON: {exc}") from exc
    model = parse_model(document, source=str(entry))
    if model.id != model_id:
        raise ModelDefinitionError(
            f"{entry} describes model {model.id}, not {model_id}"
        )
    return model


def parse_model(document: Mapping[str, Any], *, source: str = "model") -> ModelDef:
    """Return the :class:`ModelDef` a SunSpec JSON model document describes.

    ``source`` names the document in error messages. Raises
    :class:`ModelDefinitionError` when the document lacks the ``id``/``group`` keys,
    when its first points are not the ``ID``/``L`` header, or when a point's type or
    size is unknown or inconsistent, or its scale factor names no point.
    """
    parser = _Parser(source)
    return parser.model(document)


class _Parser:
    """Walks one JSON model document; keeps the source name for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, what: str) -> ModelDefinitionError:
        return ModelDefinitionError(f"{self.source}: {what}")

    def model(self, document: Mapping[str, Any]) -> ModelDef:
        model_id = document.get("id")
        group = document.get("group")
        if not isinstance(model_id, int) or not isinstance(group, Mapping):
            raise self.fail("expected an integer 'id' and a 'group' object")
        raw_points = self.points_of(group, "")
        if len(raw_points) < 2 or [p.get("name") for p in raw_points[:2]] != [
            "ID",
            "L",
        ]:
            raise self.fail("the first two points must be the ID/L header")

        # The fixed block: own points, then non-repeating sub-groups, recursively,
        # up to the first group whose size depends on a count.
        fixed: list[tuple[str, Mapping[str, Any], tuple[str, ...]]] = []
        tail: list[Mapping[str, Any]] = []
        self.collect(group, "", (), fixed, tail)
        points: list[ModelPoint] = []
        offset = 0
        for path, raw, scopes in fixed:
            point = self.point(path, raw, offset, scopes, fixed)
            offset += point.size
            points.append(point)
        header, body = points[:2], points[2:]
        if header[0].size != 1 or header[1].size != 1:
            raise self.fail("ID and L must be one register each")

        # The repeating tail: one trailing group of fixed-size instances, or nothing.
        repeating: RepeatingGroup | None = None
        undecoded: list[str] = []
        if (
            len(tail) == 1
            and self.is_flat(tail[0])
            and (tail[0].get("count") == 0 or isinstance(tail[0].get("count"), str))
        ):
            repeating = self.repeating_group(tail[0], offset, fixed)
        else:
            undecoded = [str(g.get("name", "?")) for g in tail]
        return ModelDef(
            id=model_id,
            name=str(group.get("name", "")),
            label=str(group.get("label", "")),
            length=offset - HEADER_REGISTERS,
            points=tuple(body),
            repeating=repeating,
            undecoded=tuple(undecoded),
        )

    def points_of(self, group: Mapping[str, Any], path: str) -> list[Mapping[str, Any]]:
        raw = group.get("points", [])
        if not isinstance(raw, list) or not all(isinstance(p, Mapping) for p in raw):
            raise self.fail(f"group {path or 'model'}: 'points' must be a list")
        return raw

    def groups_of(self, group: Mapping[str, Any], path: str) -> list[Mapping[str, Any]]:
        raw = group.get("groups", [])
        if not isinstance(raw, list) or not all(isinstance(g, Mapping) for g in raw):
            raise self.fail(f"group {path or 'model'}: 'groups' must be a list")
        return raw

    def collect(
        self,
        group: Mapping[str, Any],
        path: str,
        scopes: tuple[str, ...],
        fixed: list[tuple[str, Mapping[str, Any], tuple[str, ...]]],
        tail: list[Mapping[str, Any]],
    ) -> None:
        """Append the fixed-block points of ``group`` (path-qualified) to ``fixed``.

        Sub-groups that repeat, or hold a repeating group, and every sub-group after
        the first of those, go to ``tail`` instead.
        """
        inner = (*scopes, path)
        for raw in self.points_of(group, path):
            fixed.append((_join(path, str(raw.get("name", ""))), raw, inner))
        for sub in self.groups_of(group, path):
            if tail or sub.get("count") is not None or not self.is_flat(sub):
                tail.append(sub)
                continue
            self.collect(sub, _join(path, str(sub.get("name", ""))), inner, fixed, tail)

    def is_flat(self, group: Mapping[str, Any]) -> bool:
        """Tell whether a repeating group's instances have one fixed size."""
        return all(
            sub.get("count") is None and self.is_flat(sub)
            for sub in self.groups_of(group, str(group.get("name", "")))
        )

    def repeating_group(
        self,
        group: Mapping[str, Any],
        offset: int,
        fixed: list[tuple[str, Mapping[str, Any], tuple[str, ...]]],
    ) -> RepeatingGroup:
        name = str(group.get("name", ""))
        count: int | str = group.get("count", 0)
        inner: list[tuple[str, Mapping[str, Any], tuple[str, ...]]] = []
        self.collect(group, name, ("",), inner, [])
        scope_points = fixed + inner
        points: list[ModelPoint] = []
        position = 0
        for path, raw, scopes in inner:
            point = self.point(path, raw, position, scopes, scope_points)
            position += point.size
            points.append(point)
        return RepeatingGroup(name, offset, position, count, tuple(points))

    def point(
        self,
        path: str,
        raw: Mapping[str, Any],
        offset: int,
        scopes: tuple[str, ...],
        known: list[tuple[str, Mapping[str, Any], tuple[str, ...]]],
    ) -> ModelPoint:
        """Parse one JSON point found at ``path``, ``offset`` registers in."""
        if not isinstance(raw.get("name"), str) or not raw["name"]:
            raise self.fail(f"a point after {path or 'the start'} has no name")
        kind = raw.get("type")
        size = raw.get("size")
        if not isinstance(kind, str) or kind not in _TYPES:
            raise self.fail(f"point {path}: unknown type {kind!r}")
        if not isinstance(size, int) or size < 1:
            raise self.fail(f"point {path}: size must be a positive integer")
        point_type, sentinel = _TYPES[kind]
        if (
            point_type is not None
            and point_type is not PointType.STRING
            and point_type.registers != size
        ):
            raise self.fail(
                f"point {path}: type {kind} takes {point_type.registers} registers, "
                f"size says {size}"
            )
        return ModelPoint(
            name=path,
            offset=offset,
            size=size,
            sunspec_type=kind,
            type=point_type,
            scale_factor=self.scale_factor(path, raw.get("sf"), scopes, known),
            units=str(raw.get("units", "")),
            label=str(raw.get("label", "")),
            mandatory=raw.get("mandatory") == "M",
            not_implemented=sentinel,
        )

    def scale_factor(
        self,
        path: str,
        sf: object,
        scopes: tuple[str, ...],
        known: list[tuple[str, Mapping[str, Any], tuple[str, ...]]],
    ) -> str | int | None:
        """Resolve a point's ``sf`` to the nearest enclosing group's point so named."""
        if sf is None:
            return None
        if isinstance(sf, int) and not isinstance(sf, bool):
            return sf
        if not isinstance(sf, str):
            raise self.fail(f"point {path}: sf must be a point name or an integer")
        names = {name for name, _, _ in known}
        for scope in reversed(scopes):
            candidate = _join(scope, sf)
            if candidate in names:
                return candidate
        raise self.fail(f"point {path}: scale factor {sf} names no point")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
