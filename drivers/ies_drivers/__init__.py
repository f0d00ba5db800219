"""Device protocol code of the IES edge agent, usable without the daemon.

Subpackages hold one protocol each (``modbus``, ``sunspec``, ...). Protocol parsing
is free of I/O: bytes in, values or events out. The asyncio transports around it
are thin.
"""

__all__: list[str] = []
