"""Launchers: processes that start the service's parts together (`make run`'s embedded mode)."""
