"""Read plans: a device's points merged into as few register reads as possible.

Pure functions, no I/O. :func:`plan_blocks` turns the points of one device into
:class:`Block` reads of at most 125 registers per function; :func:`decode_device` turns
the registers those reads returned back into one decoded value per point.

Why merge: on a 9600-baud RS-485 line every request costs a request frame, the
device's turnaround and the silent gap before the next one, easily 20-50 ms, while one
more register in a response costs 2 ms. A gap between two points is therefore read
through when it is at most ``max_gap`` registers; wider gaps start a new read. Some
devices answer exception 2 (illegal data address) for registers in a gap; their
templates set ``max_gap=0``.

SunSpec scale factors (``sunssf`` points) can sit in another block than the points
they scale, so :func:`decode_device` decodes every scale factor of the device first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ies_drivers.errors import DecodeError, ExceptionResponse, TemplateError
from ies_drivers.modbus.codec import (
    PointValue,
    decode_point,
    decode_scale_factor,
    raw_text,
)
from ies_drivers.modbus.model import PointSpec, PointType, RegisterFunction
from ies_drivers.reading import ReadingState

MAX_BLOCK = 125
"""Most registers one read may ask for (Modbus application protocol, function 3/4)."""
DEFAULT_MAX_GAP = 16
"""Unused registers read through rather than paying for another request."""

FUNCTION_CODES: dict[RegisterFunction, int] = {"holding": 3, "input": 4}
"""Modbus function code that reads each register table."""


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers from ``address`` with ``function``.

    ``function`` is the Modbus function code (3 holding, 4 input registers). ``points``
    are the points the block covers, in address order; each lies wholly inside it.
    """

    function: int
    address: int
    count: int
    points: tuple[PointSpec, ...]

    @property
    def end(self) -> int:
        """First register address after the block."""
        return self.address + self.count


class PointRead(NamedTuple):
    """A point, its decoded value and its ``raw`` evidence text."""

    spec: PointSpec
    value: PointValue
    raw: str


def plan_blocks(
    points: Sequence[PointSpec],
    *,
    max_block: int = MAX_BLOCK,
    max_gap: int = DEFAULT_MAX_GAP,
) -> list[Block]:
    """Merge the points of one device into read blocks.

    Points are grouped by function (holding before input) and walked in address order;
    a point joins the current block when the registers between them number at most
    ``max_gap`` and the grown block stays within ``max_block`` registers. Overlapping
    points share registers. A point is never split across blocks. The result is the
    same for the same points in any order.

    Raises :class:`ValueError` for ``max_block`` outside 1..125 or a negative
    ``max_gap``, and :class:`TemplateError` for a point that cannot be read in one
    request (no registers, more than ``max_block``, past register 65535, unknown
    function).
    """
    if not 1 <= max_block <= MAX_BLOCK:
        raise ValueError(f"max_block {max_block} is outside 1..{MAX_BLOCK}")
    if max_gap < 0:
        raise ValueError(f"max_gap {max_gap} is negative")
    by_function: dict[int, list[PointSpec]] = {}
    for point in points:
        _check_point(point, max_block)
        by_function.setdefault(FUNCTION_CODES[point.function], []).append(point)

    blocks: list[Block] = []
    for function in sorted(by_function):
        ordered = sorted(
            by_function[function], key=lambda p: (p.address, p.end, p.name)
        )
        start = ordered[0].address
        end = ordered[0].end
        members: list[PointSpec] = [ordered[0]]
        for point in ordered[1:]:
            grown_end = max(end, point.end)
            if point.address - end <= max_gap and grown_end - start <= max_block:
                members.append(point)
                end = grown_end
                continue
            blocks.append(Block(function, start, end - start, tuple(members)))
            start, end, members = point.address, point.end, [point]
        blocks.append(Block(function, start, end - start, tuple(members)))
    return blocks


def _check_point(point: PointSpec, max_block: int) -> None:
    """Raise :class:`TemplateError` unless ``point`` fits one read of ``max_block``."""
    if point.function not in FUNCTION_CODES:
        raise TemplateError(
            f"point {point.name}: function {point.function!r} is neither 'holding' "
            "nor 'input'"
        )
    if point.count < 1:
        raise TemplateError(
            f"point {point.name}: a {point.type.value} point needs a length in "
            "registers"
        )
    if point.count > max_block:
        raise TemplateError(
            f"point {point.name}: {point.count} registers do not fit one read of at "
            f"most {max_block}"
        )
    if point.address < 0 or point.end > 0x10000:
        raise TemplateError(
            f"point {point.name}: registers {point.address}..{point.end - 1} are "
            "outside 0..65535"
        )


def _registers_of(
    block: Block, point: PointSpec, registers: Sequence[int]
) -> Sequence[int]:
    """Return the slice of the block's registers that holds ``point``."""
    return registers[point.address - block.address : point.end - block.address]


def _check_length(block: Block, registers: Sequence[int]) -> None:
    """Raise :class:`DecodeError` unless ``registers`` is exactly the block's image."""
    if len(registers) != block.count:
        raise DecodeError(
            f"block at {block.address} (function {block.function}) needs "
            f"{block.count} registers, got {len(registers)}"
        )


def decode_scale_factors(
    reads: Sequence[tuple[Block, Sequence[int]]],
) -> tuple[dict[str, int | None], dict[str, str]]:
    """Decode every ``sunssf`` point in ``reads`` (blocks with their registers).

    Returns the powers of ten by point name (``None`` = not implemented) and, for
    scale factors that could not be decoded, the reason by name. Raises
    :class:`DecodeError` when a block's register count is wrong.
    """
    factors: dict[str, int | None] = {}
    problems: dict[str, str] = {}
    for block, registers in reads:
        _check_length(block, registers)
        for point in block.points:
            if point.type is not PointType.SUNSSF:
                continue
            try:
                factors[point.name] = decode_scale_factor(
                    point, _registers_of(block, point, registers)
                )
            except DecodeError as exc:
                problems[point.name] = str(exc)
    return factors, problems


def decode_block(
    block: Block,
    registers: Sequence[int],
    *,
    sunspec: bool = False,
    scale_factors: Mapping[str, int | None] | None = None,
    scale_factor_problems: Mapping[str, str] | None = None,
) -> list[PointRead]:
    """Decode every point of ``block`` from the ``registers`` read for it.

    ``scale_factors`` holds the device's decoded scale factors (see
    :func:`decode_scale_factors`); a point whose scale factor is missing or listed in
    ``scale_factor_problems`` becomes an ERROR value saying so. A point that fails to
    decode becomes an ERROR value with the reason in ``note`` and never stops the
    others. Raises :class:`DecodeError` only when ``registers`` does not hold exactly
    ``block.count`` values.
    """
    _check_length(block, registers)
    problems = scale_factor_problems or {}
    results: list[PointRead] = []
    for point in block.points:
        own = _registers_of(block, point, registers)
        raw = raw_text(block.function, point.address, own)
        value: PointValue
        try:
            if point.type is PointType.SUNSSF:
                exponent = decode_scale_factor(point, own)
                value = (
                    PointValue(None, ReadingState.NOT_IMPLEMENTED, "sentinel")
                    if exponent is None
                    else PointValue(str(exponent), ReadingState.OK)
                )
            elif point.scale_factor is not None and point.scale_factor in problems:
                value = PointValue(
                    None,
                    ReadingState.ERROR,
                    f"scale factor {point.scale_factor} is unusable: "
                    f"{problems[point.scale_factor]}",
                )
            else:
                value = decode_point(
                    point, own, sunspec=sunspec, scale_factors=scale_factors
                )
        except DecodeError as exc:
            value = PointValue(None, ReadingState.ERROR, str(exc))
        results.append(PointRead(point, value, raw))
    return results


def failed_block(block: Block, error: Exception) -> list[PointRead]:
    """Return an ERROR value for every point of a block the device refused to read.

    The note is the error's message; for a Modbus exception response the ``raw`` text
    holds the exception PDU (function | 0x80, code), otherwise no bytes.
    """
    data = b""
    if isinstance(error, ExceptionResponse):
        data = bytes((block.function | 0x80, error.code & 0xFF))
    results = []
    for point in block.points:
        raw = f"modbus:fc{block.function:02d}:0x{point.address:04x}:{data.hex()}"
        results.append(
            PointRead(point, PointValue(None, ReadingState.ERROR, str(error)), raw)
        )
    return results


def decode_device(
    points: Sequence[PointSpec],
    results: Sequence[tuple[Block, Sequence[int] | Exception]],
    *,
    sunspec: bool = False,
) -> list[PointRead]:
    """Decode a device's points from the outcome of each of its blocks.

    ``results`` pairs each planned block with its registers, or with the error that
    kept it from being read (e.g. an :class:`ExceptionResponse`): that block's points
    become ERROR values, the others are decoded. Scale factors are decoded first
    across all blocks. Returns one :class:`PointRead` per entry of ``points``, in the
    order of ``points``. Raises :class:`DecodeError` when a block's register count is
    wrong and :class:`ValueError` when a point is in no block.
    """
    good = [(b, r) for b, r in results if not isinstance(r, Exception)]
    factors, problems = decode_scale_factors(good)
    decoded: dict[PointSpec, PointRead] = {}
    for block, outcome in results:
        if isinstance(outcome, Exception):
            reads = failed_block(block, outcome)
        else:
            reads = decode_block(
                block,
                outcome,
                sunspec=sunspec,
                scale_factors=factors,
                scale_factor_problems=problems,
            )
        for read in reads:
            decoded.setdefault(read.spec, read)
    try:
        return [decoded[point] for point in points]
    except KeyError as exc:
        raise ValueError(f"point {exc.args[0].name} is in no block") from None
