"""What installers and operators see: the local web page, metrics and the status file.

Importing this package is cheap: aiohttp and prometheus-client are imported only by
:mod:`ies_agent.web.server` and :mod:`ies_agent.metrics`, which the agent loads only
when the site file has an ``[http]`` table.
"""
