"""Upstream delivery of the evidence log: MQTT brokers, IES endpoints, a directory.

One cursor per upstream over the evidence log, persisted in the data directory; no
second copy of the data. Modules:

- ``settings``: the ``[[upstreams]]`` and ``[storage]`` tables of a site file;
- ``cursor``: cursors on disk, written atomically;
- ``reader``: batches read from ``evidence.jsonl`` / ``checkpoints.jsonl``;
- ``payload``: the evidence batch and confirmation messages (bytes in, objects out);
- ``delivery``: the connector (cursor, window, replay, back-off) all kinds share;
- ``mqtt``, ``ies_https``, ``filesink``: the transports;
- ``beckn``: Beckn request signing and verification;
- ``meterdata``: IES MeterData v0.6 profiles from evidence entries;
- ``diskguard``: the storage alarm; ``commands``: inbound commands;
- ``manager``: starts and finishes all of it for a run.

Errors are in ``ies_agent.upstream.errors``. Importing this package imports neither
aiomqtt nor aiohttp; a transport imports its library when it first connects.
"""
