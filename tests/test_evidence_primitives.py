"""Canonical JSON, RFC 6962 hashing and proofs, C2SP signed notes: against the vectors.

Vectors are the copies in ``tests/data/vectors`` (see its README and SOURCES.md): the
transparency-dev Merkle constants, the signed-note examples (Go reference, Rekor, Pixel)
and the worked example of our own log, which must be reproduced byte for byte.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evidence_fixtures import (
    EXAMPLE,
    VECTORS,
    example_ed25519_signer,
    example_p256_signer,
)
from ies_agent.evidence import canonical, merkle, note
from ies_agent.evidence.errors import EvidenceFormatError, NoteError, ProofError


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


MERKLE = _load(VECTORS / "merkle" / "rfc6962_vectors.json")
NOTES = _load(VECTORS / "signed_note" / "note_vectors.json")
EXAMPLE_META = _load(EXAMPLE / "ocmf_export_and_meta.json")
EXAMPLE_LINES = (EXAMPLE / "entries.jsonl").read_bytes().splitlines()
LEAF_HASHES = [bytes.fromhex(h) for h in MERKLE["leaf_hashes"]]


# --- canonical JSON -----------------------------------------------------------------


def test_worked_example_entries_are_canonical() -> None:
    for line in EXAMPLE_LINES:
        entry = canonical.parse_entry(line)
        assert canonical.canonical_bytes(entry) == line


def test_canonical_sorts_keys_and_drops_whitespace() -> None:
    entry = {"val": "1.5", "seq": 3, "a": [True, None, {"z": 1, "b": "é"}]}
    assert canonical.canonical_bytes(entry) == (
        '{"a":[true,null,{"b":"é","z":1}],"seq":3,"val":"1.5"}'.encode()
    )


def test_canonical_escapes_like_rfc8785() -> None:
    entry = {"s": 'q"\\\n\t\x01\x7f\u2028'}
    assert canonical.canonical_bytes(entry) == (
        b'{"s":"q\\"\\\\\\n\\t\\u0001\x7f\xe2\x80\xa8"}'
    )


def test_canonical_orders_keys_by_utf16_code_units() -> None:
    # U+1F600 is D83D DE00 in UTF-16, which sorts before U+FF21 (code point order
    # would put it after).
    entry = {"\uff21": 1, "\U0001f600": 2, "a": 3}
    assert canonical.canonical_bytes(entry) == (
        '{"a":3,"\U0001f600":2,"\uff21":1}'.encode()
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"x": 1.5}, "floats are not allowed"),
        ({"x": 2**53}, "beyond 2**53"),
        ({"x": -(2**53)}, "beyond 2**53"),
        ({"x": b"raw"}, "bytes cannot be stored"),
        ({1: "x"}, "is not a string"),
        ({"x": "\ud800"}, "not valid Unicode"),
    ],
)
def test_canonical_refuses_values_outside_the_subset(value: Any, words: str) -> None:
    with pytest.raises(EvidenceFormatError, match=re.escape(words)):
        canonical.canonical_bytes(value)


def test_largest_safe_integer_is_kept() -> None:
    assert canonical.canonical_bytes({"x": 2**53 - 1}) == b'{"x":9007199254740991}'


@pytest.mark.parametrize(
    "line",
    [
        b'{"b":1,"a":2}',  # key order
        b'{"a": 1}',  # whitespace
        b'{"a":1.0}',  # float form
        b'{"a":1e2}',
        b'{"a":-0}',
        b'{"a":1,"a":1}',  # duplicate key
        b'{"a":"\\u0041"}',  # needless escape
        b'{"a":"x"} ',
        b"[1]",
        b'{"a":NaN}',
        b'{"a":"\xff"}',
        b"",
        b'{"a":9007199254740992}',
    ],
)
def test_parse_entry_rejects_non_canonical_lines(line: bytes) -> None:
    with pytest.raises(EvidenceFormatError):
        canonical.parse_entry(line)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=["Cs"])), inner)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.text(st.characters(exclude_categories=["Cs"])), _json_values))
def test_canonical_round_trip(entry: dict[str, Any]) -> None:
    line = canonical.canonical_bytes(entry)
    assert b"\n" not in line
    assert canonical.parse_entry(line) == entry


# --- RFC 6962 -----------------------------------------------------------------------


def test_leaf_hashes_match_vectors() -> None:
    for data_hex, expected in zip(MERKLE["leaf_inputs_hex"], LEAF_HASHES, strict=True):
        assert merkle.leaf_hash(bytes.fromhex(data_hex)) == expected


def test_roots_by_size_match_vectors() -> None:
    frontier = merkle.MerkleFrontier()
    assert frontier.root() == bytes.fromhex(MERKLE["roots_by_size"][0])
    for size in range(1, len(LEAF_HASHES) + 1):
        frontier.append(LEAF_HASHES[size - 1])
        expected = bytes.fromhex(MERKLE["roots_by_size"][size])
        assert frontier.size == size
        assert frontier.root() == expected
        assert merkle.root_from_leaves(LEAF_HASHES[:size]) == expected


@pytest.mark.parametrize(
    "case", MERKLE["inclusion"], ids=lambda c: str(c["leaf_index"])
)
def test_inclusion_proofs_match_vectors(case: dict[str, Any]) -> None:
    proof = [bytes.fromhex(h) for h in case["proof"]]
    leaf = bytes.fromhex(case["leaf_hash"])
    root = bytes.fromhex(case["root"])
    index, size = case["leaf_index"], case["tree_size"]
    assert merkle.leaf_hash(bytes.fromhex(case["leaf_input_hex"])) == leaf
    assert merkle.inclusion_proof(LEAF_HASHES, index, size) == proof
    assert merkle.verify_inclusion(leaf, index, size, proof, root)
    # Any other leaf, position, size or a shortened proof fails.
    other = LEAF_HASHES[(index + 1) % size]
    assert not merkle.verify_inclusion(other, index, size, proof, root)
    assert not merkle.verify_inclusion(leaf, (index + 1) % size, size, proof, root)
    assert not merkle.verify_inclusion(leaf, index, size, proof[:-1], root)
    assert not merkle.verify_inclusion(leaf, index, size, [*proof, leaf], root)


@pytest.mark.parametrize(
    "case", MERKLE["consistency"], ids=lambda c: f"{c['size1']}-{c['size2']}"
)
def test_consistency_proofs_match_vectors(case: dict[str, Any]) -> None:
    proof = [bytes.fromhex(h) for h in case["proof"]]
    old_root, new_root = bytes.fromhex(case["root1"]), bytes.fromhex(case["root2"])
    old, new = case["size1"], case["size2"]
    assert merkle.consistency_proof(LEAF_HASHES, old, new) == proof
    assert merkle.verify_consistency(old, new, old_root, new_root, proof)
    assert not merkle.verify_consistency(old, new, new_root, new_root, proof)
    assert not merkle.verify_consistency(old, new, old_root, old_root, proof)
    assert not merkle.verify_consistency(old, new, old_root, new_root, proof[1:])


def test_every_proof_in_a_larger_tree_verifies() -> None:
    leaves = [merkle.leaf_hash(str(i).encode()) for i in range(37)]
    frontier = merkle.MerkleFrontier()
    roots = [frontier.root()]
    for leaf in leaves:
        frontier.append(leaf)
        roots.append(frontier.root())
    for size in range(1, 38):
        assert roots[size] == merkle.root_from_leaves(leaves[:size])
        for index in range(size):
            proof = merkle.inclusion_proof(leaves, index, size)
            assert merkle.verify_inclusion(
                leaves[index], index, size, proof, roots[size]
            )
        for old in range(0, size + 1):
            proof = merkle.consistency_proof(leaves, old, size)
            assert merkle.verify_consistency(old, size, roots[old], roots[size], proof)


def test_frontier_round_trips_through_json() -> None:
    frontier = merkle.MerkleFrontier()
    for leaf in LEAF_HASHES[:7]:
        frontier.append(leaf)
    saved = json.loads(json.dumps(frontier.to_json()))
    restored = merkle.MerkleFrontier.from_json(saved)
    assert restored.size == 7 and restored.root() == frontier.root()
    restored.append(LEAF_HASHES[7])
    assert restored.root() == bytes.fromhex(MERKLE["roots_by_size"][8])
    assert frontier.size == 7


def test_frontier_rejects_damaged_json() -> None:
    with pytest.raises(ProofError, match="subtree hashes"):
        merkle.MerkleFrontier.from_json({"size": 7, "subtrees": []})
    with pytest.raises(ProofError, match="integer"):
        merkle.MerkleFrontier.from_json({"size": -1, "subtrees": []})
    with pytest.raises(ProofError, match="32"):
        merkle.MerkleFrontier.from_json({"size": 1, "subtrees": ["AAAA"]})


def test_proof_arguments_out_of_range_raise() -> None:
    with pytest.raises(ProofError):
        merkle.inclusion_proof(LEAF_HASHES, 8, 8)
    with pytest.raises(ProofError):
        merkle.consistency_proof(LEAF_HASHES, 5, 9)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(LEAF_HASHES[0], 0, 1, [], b"short")


def test_worked_example_leaves_and_root() -> None:
    leaves = [merkle.leaf_hash(line) for line in EXAMPLE_LINES]
    assert [h.hex() for h in leaves] == EXAMPLE_META["leaf_hashes_hex"]
    assert merkle.root_from_leaves(leaves).hex() == EXAMPLE_META["root_hex"]


# --- signed notes -------------------------------------------------------------------


@pytest.mark.parametrize("case", NOTES["cases"], ids=lambda c: c["id"])
def test_note_vectors(case: dict[str, Any]) -> None:
    verifier = note.parse_vkey(case["verifier_key"])
    assert verifier.vkey == case["verifier_key"]
    if case["expect_verifies"]:
        opened = note.open_note(case["note"], [verifier])
        assert opened.text == case["text"]
        assert opened.verified_by == [verifier.label]
        assert opened.unknown_sigs == 0
    else:
        with pytest.raises(NoteError, match="does not verify"):
            note.open_note(case["note"], [verifier])


def _go_test_signer() -> note.Ed25519NoteSigner:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    case = NOTES["cases"][0]
    _, _, name, _, body = case["signer_key_published_test_only"].split("+", 4)
    raw = base64.b64decode(body)
    assert raw[0] == note.ALG_ED25519
    return note.Ed25519NoteSigner(
        name, ed25519.Ed25519PrivateKey.from_private_bytes(raw[1:])
    )


def test_go_reference_note_is_reproduced() -> None:
    case = NOTES["cases"][0]
    signer = _go_test_signer()
    assert signer.vkey() == case["verifier_key"]
    assert note.sign_note(case["text"], [signer]) == case["note"]


def test_note_with_unknown_key_counts_it() -> None:
    case = NOTES["cases"][1]
    other = note.parse_vkey(NOTES["cases"][0]["verifier_key"])
    opened = note.open_note(case["note"], [other])
    assert opened.verified_by == [] and opened.unknown_sigs == 1


def test_worked_example_checkpoint_is_reproduced_byte_for_byte() -> None:
    ed_signer, p256_signer = example_ed25519_signer(), example_p256_signer()
    assert ed_signer.vkey() == (EXAMPLE / "log_key.vkey").read_text().strip()
    assert p256_signer.vkey() == (EXAMPLE / "log_key_p256.vkey").read_text().strip()
    root = bytes.fromhex(EXAMPLE_META["root_hex"])
    text = note.checkpoint_text("evidence.example/agent/AGENT-0001/log-1", 7, root)
    signed = note.sign_note(text, [ed_signer, p256_signer])
    assert signed == (EXAMPLE / "checkpoint.note").read_text(encoding="utf-8")


def test_worked_example_checkpoint_opens_and_parses() -> None:
    verifiers = [
        note.parse_vkey((EXAMPLE / name).read_text())
        for name in ("log_key.vkey", "log_key_p256.vkey")
    ]
    opened = note.open_note((EXAMPLE / "checkpoint.note").read_text(), verifiers)
    assert len(opened.verified_by) == 2
    checkpoint = note.parse_checkpoint(opened.text)
    assert checkpoint.origin == "evidence.example/agent/AGENT-0001/log-1"
    assert checkpoint.size == 7
    assert checkpoint.root.hex() == EXAMPLE_META["root_hex"]
    assert checkpoint.extension_lines == ()


def test_p256_signatures_are_low_s_and_deterministic() -> None:
    signer = example_p256_signer()
    verifier = note.parse_vkey(signer.vkey())
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    for i in range(40):
        msg = f"message {i}\n".encode()
        sig = signer.sign(msg)
        assert sig == signer.sign(msg)
        assert decode_dss_signature(sig)[1] <= note.P256_ORDER // 2
        assert verifier.verify(msg, sig)
        assert not verifier.verify(msg + b"x", sig)


def test_worked_example_inclusion_bundle_verifies() -> None:
    bundle = _load(EXAMPLE / "inclusion_bundle_seq3.json")
    verifier = note.parse_vkey((EXAMPLE / "log_key.vkey").read_text())
    checkpoint = note.parse_checkpoint(
        note.open_note(bundle["checkpoint"], [verifier]).text
    )
    entry = bundle["entry"].encode()
    proof = [base64.b64decode(h) for h in bundle["proof"]]
    leaves = [merkle.leaf_hash(line) for line in EXAMPLE_LINES]
    assert checkpoint.size == bundle["tree_size"]
    assert merkle.inclusion_proof(leaves, 3, 7) == proof
    assert merkle.verify_inclusion(
        merkle.leaf_hash(entry), bundle["leaf_index"], 7, proof, checkpoint.root
    )
    assert not merkle.verify_inclusion(
        merkle.leaf_hash(entry.replace(b"12346.012", b"12346.013")),
        3,
        7,
        proof,
        checkpoint.root,
    )


@pytest.mark.parametrize(
    ("vkey", "words"),
    [
        ("nameonly", "form name"),
        ("a+zz+AR2a", "8 hex digits"),
        ("a+00000000+!!!", "bad hex or base64"),
        ("a+00000000+Aw==", "type 0x03"),
        ("a+00000000+AR2aaY6md8IpygsmUNuafPGXzxgtFh0WZt/Piw6svQvW", "hashes to"),
        ("a b+00000000+AQ==", "not allowed"),
    ],
)
def test_parse_vkey_rejects_malformed_keys(vkey: str, words: str) -> None:
    with pytest.raises(NoteError, match=re.escape(words)):
        note.parse_vkey(vkey)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("no blank line\n— a AAAAAAA=\n", "blank line"),
        ("text\n\n— a AAAAAAA=", "end with a newline"),
        ("text\n\nnot a signature\n", "malformed signature"),
        ("text\n\n— a !!!\n", "not valid base64"),
        ("text\n\n— a AAA=\n", "too short"),
        ("te\x00xt\n\n— a AAAAAAA=\n", "control character"),
    ],
)
def test_open_note_rejects_malformed_notes(text: str, words: str) -> None:
    with pytest.raises(NoteError, match=re.escape(words)):
        note.open_note(text, [])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("origin\n7\n", "origin, size and root"),
        ("origin\n07\nUZK3lT54ksqZiVOvxnoq/oDHlMkKJNcknK8vzqK4vQw=\n", "decimal"),
        ("origin\n-7\nUZK3lT54ksqZiVOvxnoq/oDHlMkKJNcknK8vzqK4vQw=\n", "decimal"),
        ("origin\n7\nUZK3lT54\n", "bytes"),
        ("origin\n7\nUZK3lT54ksqZiVOvxnoq/oDHlMkKJNcknK8vzqK4vQw=", "newline"),
    ],
)
def test_parse_checkpoint_rejects_malformed_bodies(text: str, words: str) -> None:
    with pytest.raises(NoteError, match=re.escape(words)):
        note.parse_checkpoint(text)


def test_checkpoint_extension_lines_are_kept() -> None:
    root = bytes(32)
    text = note.checkpoint_text("o", 5, root) + "ext one\n"
    assert note.parse_checkpoint(text).extension_lines == ("ext one",)
