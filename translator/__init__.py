"""The Serval translator appliance: legacy TCP clients to Serval services, and back.

The appliance is one supervisor process (``serval-translator run --config FILE``):

- ``translator.config``: the YAML file, validated with file:line:column in every message;
- ``translator.supervisor``: the asyncio supervisor (startup, SIGHUP reload, SIGTERM drain);
- ``translator.stack``: the bundled servald (started, watched, restarted) or an existing one;
- ``translator.listeners``: TCP listeners, each client mapped to a Serval connection;
- ``translator.exporters``: Serval services served by local legacy TCP servers;
- ``translator.relay``: the splice_ext relay engine, connection records and per-connection logs;
- ``translator.metrics``, ``translator.status``, ``translator.sdnotify``,
  ``translator.logsetup``, ``translator.proxy_protocol``: operations.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
