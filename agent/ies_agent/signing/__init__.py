"""Signed manifests checked against trusted publisher keys.

Kept free of the rest of the agent (standard library and ``cryptography`` only) so the
gateway's self-update and the firmware bridge (DESIGN.md section 8) share one verifier.
"""
