"""The API's settings refuse what would run but never work as meant."""

from __future__ import annotations

import pytest

from api.settings import Settings
from stream_engine.exceptions import ConfigError


@pytest.mark.parametrize(
    "origin", ["https://shop.example/", "shop.example", "https://shop.example/beacon",
               "https://shop.example:99999"],
)  # fmt: skip
def test_a_cors_origin_no_browser_sends_is_refused(origin: str) -> None:
    """Starlette compares the Origin header with each entry as a string; a browser sends
    scheme://host[:port], so an entry with a trailing slash or a path (or none of the
    scheme) allowed nothing, and every beacon from that shop was refused in silence."""
    with pytest.raises(ConfigError, match=r"KAIROS_CORS_ORIGINS: .* is not an origin"):
        Settings.from_env({"KAIROS_CORS_ORIGINS": f"https://ok.example,{origin}"})


def test_origins_a_browser_sends_are_taken() -> None:
    raw = "https://shop.example, http://localhost:3000,http://[::1]:8080"
    assert Settings.from_env({"KAIROS_CORS_ORIGINS": raw}).origins == [
        "https://shop.example", "http://localhost:3000", "http://[::1]:8080"]  # fmt: skip
    assert Settings.from_env({"KAIROS_CORS_ORIGINS": "*"}).origins == ["*"]
