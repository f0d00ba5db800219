"""The IES edge agent daemon: config, scheduling, evidence log, upstreams, CLI."""

__version__ = "0.1.0"
