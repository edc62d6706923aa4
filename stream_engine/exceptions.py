"""The stream engine's errors: one root, leaves that say what the caller should do."""

from __future__ import annotations


class KairosError(Exception):
    """Root of every error Kairos raises on purpose."""


class ConfigError(KairosError, ValueError):
    """A setting is missing or malformed; the message names the variable and the value."""
