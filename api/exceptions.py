"""The decision API's errors: one root; leaves say what the caller should do."""

from __future__ import annotations

from stream_engine.exceptions import KairosError


class ApiError(KairosError):
    """Root of every error the decision API raises on purpose."""


class ConfigFileError(ApiError, ValueError):
    """The decision config is invalid; the message names the file, the entry and the problem.
    The config in force stays in force."""


class BadRequest(ApiError):
    """The caller sent something we refuse; `status` is the HTTP status to answer with."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
