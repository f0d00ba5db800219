"""OCPP-J transport: frames, versions, tolerant validation, measurand normalisation.

Everything here is pure (text in, values out) so captured frames from the field become
plain unit tests; the agent's central system (``ies_agent.ocpp``) wraps it in
WebSocket I/O. Modules:

- ``rpc``: the OCPP-J RPC frames ``[2,id,action,payload]``, ``[3,id,payload]`` and
  ``[4,id,code,description,details]``: parse with typed errors, serialise with exact
  decimals, the error-code spellings of each version.
- ``versions``: the OCPP versions and their WebSocket subprotocol names; negotiation.
- ``validation``: payload checks against the official JSON schemas that tell a
  tolerable field violation (logged) from one that makes the data meaningless
  (answered with a CALLERROR), with per-charger quirk flags.
- ``measurands``: sampled values normalised to exact decimals in base units with
  their OBIS codes (from ``configs/ocpp/measurands.toml``), signed values kept exact.
"""
