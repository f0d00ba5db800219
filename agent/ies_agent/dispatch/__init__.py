"""Dispatch: answer demand-response events safely, explainably and verifiably.

The path of one event (DESIGN.md section 9)::

    source (MQTT / Beckn DemandFlexNeed / OpenADR 2.0b)
      -> authenticate (pinned keys, ``auth``) -> validate (``model``)
      -> policy pack (``policy``: clause trace) -> plan (``planner``)
      -> execute with read-back (``executor``) -> revert on time, opt-out or lost
         contact -> acknowledge (``engine``) -> measure and verify (``mv``)

Every step is an evidence event: ``dispatch_received``, ``dispatch_decision``,
``dispatch_command``, ``dispatch_readback``, ``dispatch_revert``, ``dispatch_ack``,
``mv_result``. Errors live in :mod:`ies_agent.dispatch.errors`.
"""
