"""Selective disclosure: one entry of the log with the proof that a checkpoint holds it.

A bundle lets the gateway's owner show a single reading to someone (a utility, an
auditor, a customer) without handing over the rest of the log. It holds the entry's
exact bytes, its RFC 6962 inclusion proof and the signed checkpoint whose tree it is a
leaf of; anyone with the gateway's public key checks it with ``ies-agent verify
bundle.json --key FILE``. The layout is that of
``shared/vectors/evidence_example/inclusion_bundle_seq3.json``::

    {"entry": "<line>", "leaf_index": N, "tree_size": S,
     "proof": ["<base64>", ...], "checkpoint": "<signed note>",
     "keys": ["<vkey>", ...]}

``keys`` is a hint (the key card's keys) for a reader who has not pinned one; the
verifier says so when it relies on it.

Errors: :class:`~ies_agent.evidence.errors.ProofError` when no checkpoint covers the
entry or the log does not match the checkpoints (run ``ies-agent verify``);
:class:`~ies_agent.evidence.verify.VerifyInputError` when PATH holds no log.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from ies_agent.evidence import merkle, note
from ies_agent.evidence.errors import NoteError, ProofError
from ies_agent.evidence.verify import (
    KEY_CARD,
    VerifyInputError,
    directory_checkpoints,
    find_log,
)


def build_bundle(path: Path, seq: int) -> dict[str, Any]:
    """Return the disclosure bundle of entry ``seq`` of the log at ``path``.

    ``path`` is a data directory, a directory like the worked example, or the log
    file of one (a lone log file has no checkpoints to prove with).
    The smallest checkpoint whose tree holds ``seq`` (and matches the log) is used.
    Raises ``ProofError`` when ``seq`` is outside the log, no checkpoint covers it
    yet, or the stored line is not entry ``seq``; ``VerifyInputError`` when there is
    no log at ``path``.
    """
    log_path, directory = find_log(path)

    # Checkpoints that could cover seq, smallest first.
    candidates: list[tuple[int, str, note.Checkpoint]] = []
    for record in directory_checkpoints(directory):
        try:
            text, _ = note.split_note(record.note)
            checkpoint = note.parse_checkpoint(text)
        except NoteError:
            continue
        if seq < checkpoint.size:
            candidates.append((checkpoint.size, record.note, checkpoint))
    candidates.sort(key=lambda item: item[0])
    wanted = candidates[-1][0] if candidates else seq + 1

    # One pass over the log: the entry, and the leaf hashes the trees need.
    leaves: list[bytes] = []
    line: bytes | None = None
    count = 0
    try:
        with log_path.open("rb") as stream:
            for raw in stream:
                if not raw.endswith(b"\n"):
                    break  # a torn last piece is never an entry
                if count == seq:
                    line = raw[:-1]
                if count < wanted:
                    leaves.append(merkle.leaf_hash(raw[:-1]))
                count += 1
    except OSError as exc:
        raise VerifyInputError(f"cannot read {log_path}: {exc}") from None
    if line is None:
        raise ProofError(
            f"seq {seq} is not in {log_path}, which holds entries 0..{count - 1}"
        )
    try:
        declared = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        declared = None
    if declared != seq:
        raise ProofError(
            f"line {seq + 1} of {log_path} is not entry seq {seq} (it says "
            f"{declared!r}): the log is damaged; run 'ies-agent verify {path}'"
        )
    covering = [c for c in candidates if c[0] <= count]
    if not covering:
        raise ProofError(
            f"no checkpoint covers seq {seq} yet (the agent signs one at every "
            "interval boundary and at shutdown); try again after the next one"
        )

    frontier = merkle.MerkleFrontier()
    for size, signed_note, checkpoint in covering:
        while frontier.size < size:
            frontier.append(leaves[frontier.size])
        if frontier.root() != checkpoint.root:
            continue
        proof = merkle.inclusion_proof(leaves, seq, size)
        bundle: dict[str, Any] = {
            "entry": line.decode("utf-8"),
            "leaf_index": seq,
            "tree_size": size,
            "proof": [base64.b64encode(h).decode("ascii") for h in proof],
            "checkpoint": signed_note,
        }
        hints = _key_hints(directory)
        if hints:
            bundle["keys"] = hints
        return bundle
    raise ProofError(
        f"no checkpoint covering seq {seq} matches the log: it was altered; run "
        f"'ies-agent verify {path}'"
    )


def _key_hints(directory: Path) -> list[str]:
    """Return the verifier keys of the key card in ``directory`` (current first)."""
    try:
        card = json.loads((directory / KEY_CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(card, dict):
        return []
    hints = [card.get("vkey")]
    hints += [r.get("vkey") for r in card.get("retired") or [] if isinstance(r, dict)]
    return [h for h in hints if isinstance(h, str)]
