"""SunSpec: model definitions, discovery of a device's model chain, register images.

- :mod:`.models` parses the SunSpec model definitions (JSON files of pysunspec2).
- :mod:`.discovery` walks a device's chain from ``SunS`` to the end marker, decodes
  whole models and builds a :class:`~ies_drivers.modbus.model.DeviceTemplate`.
- :mod:`.image` builds register images for simulators and tests.

Import the submodules directly; this package imports nothing itself, so a site without
SunSpec devices does not pay for it.
"""
