"""The signed, append-only evidence log: writer, keys, primitives and verifier.

Modules: ``errors`` (typed errors), ``canonical`` (canonical JSON), ``merkle``
(RFC 6962 hashing and proofs), ``note`` (C2SP signed notes and checkpoints), ``keys``
(the gateway's signing key), ``log`` (the writer, ``EvidenceLog``), ``verify`` (the
offline verifier).
Importing this package imports nothing heavy; import the module you need.
"""
