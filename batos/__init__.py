"""Shared library of BAT OS: settings, worker runtime, client, Living Image model, tokens."""

__version__ = "0.1.0"
