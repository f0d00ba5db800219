"""Typed errors of the evidence log, its keys and its verifier.

Every error says what went wrong in words an operator can act on (which file, which
``seq``, which command to run).

Error tree::

    EvidenceError                 base of everything below
    ├── EvidenceFormatError       entry bytes not canonical JSON or not a valid entry
    ├── KeyFileError              key file missing, unreadable or readable by others
    ├── LogLockedError            another agent process holds the data directory
    ├── LogRollbackError          the log is shorter than, or not, what was signed
    ├── NoteError                 malformed signed note or verifier key
    └── ProofError                malformed or non-verifying inclusion/consistency proof
"""

from __future__ import annotations


class EvidenceError(Exception):
    """Base of every error raised by ``ies_agent.evidence``."""


class EvidenceFormatError(EvidenceError):
    """Entry bytes are not canonical JSON, or the parsed entry is not a valid entry."""


class KeyFileError(EvidenceError):
    """A signing key file is missing, unreadable, malformed or readable by others."""


class LogLockedError(EvidenceError):
    """Another process (an agent already running) holds the data directory's lock."""


class LogRollbackError(EvidenceError):
    """``evidence.jsonl`` holds fewer entries than ``checkpoints.jsonl`` signed, or
    entries whose root is not the signed one.

    The log was replaced by an older copy, cut short, deleted or altered; the writer
    refuses to continue so the operator sees it instead of the log growing over it.
    """


class NoteError(EvidenceError):
    """A signed note or verifier key is malformed, or a known key's signature fails."""


class ProofError(EvidenceError):
    """An inclusion or consistency proof is malformed or does not verify."""
