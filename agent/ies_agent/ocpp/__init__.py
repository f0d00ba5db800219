"""The agent as the local OCPP central system of a site's chargers, and their bridge.

Chargers connect to the agent (OCPP 1.6J, 2.0.1, 2.1; subprotocol negotiated per
connection). For each charger the agent keeps a client connection to the charge point
operator's CSMS under the charger's identity and version, passes calls both ways,
persists billing-critical messages before answering them, replays them in order after
an outage, and adds what it owns: meter values as evidence, signed session receipts,
dispatch limits as charging profiles above the CSMS's. Modules:

- ``config``: the ``[ocpp]`` table of the site file.
- ``connection``: one OCPP-J RPC endpoint over a WebSocket (calls both ways at once,
  timeouts, typed errors).
- ``journal``: the per-charger journal of billing-critical messages, its replay
  cursor, and the small persistent state (transaction id map, auth cache, last boot).
- ``transactions``: transaction tracking and the session receipts it yields.
- ``bridge``: one charger's link to the CSMS (connect, boot replay, ordered replay).
- ``session``: one charger connection: local answers, evidence, forwarding.
- ``server``: the WebSocket server, security profiles, the dispatch API.
- ``simulator``: simulated chargers for ``ies-agent demo``.

Importing this package loads nothing heavy; ``server`` pulls in ``websockets``.
"""
