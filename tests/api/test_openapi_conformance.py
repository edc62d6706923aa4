"""The endpoints keep to their OpenAPI documents (api/openapi.py: the public one and the
admin routes'), on the served app with the real Redis and Kafka. schemathesis (its command,
configured by tests/api/schemathesis.toml) generates requests from a document, valid ones
and ones that break it, boundary values first, then random ones, and checks every answer:
a valid request is answered as documented, never with a 5xx, nor refused; one that breaks
the document is refused with a 4xx, not served as if it were fine; a method a path does
not take gets a 405; an admin route asked without its token refuses. A fixed seed: a
failure found once is found again."""

from __future__ import annotations

import asyncio
import sys
import types
from pathlib import Path

import pytest

from api.settings import Settings
from tests.api.conftest import ADMIN_TOKEN, served

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).with_name("schemathesis.toml")
NOW_MS = 1_796_000_000_000  # the clock of the collector and of the document, held still


@pytest.mark.parametrize(
    ("document_path", "one_path", "headers"),
    [
        ("/openapi.json", "/v1/slots/home_recs", {}),
        # the admin routes with their token (and without it: each must refuse)
        ("/admin/openapi.json", "/admin/pause", {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
    ],
)
async def test_the_endpoints_keep_to_their_openapi_document(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, document_path: str,
    one_path: str, headers: dict[str, str],
) -> None:  # fmt: skip
    # One clock for the document's bound on an event's time and the collector's check of
    # it: with a running clock, a time generated just past the bound passes by the time it
    # is checked.
    still = types.SimpleNamespace(time=lambda: NOW_MS / 1000)
    monkeypatch.setattr("api.collector.time", still)
    monkeypatch.setattr("api.openapi.time", still)
    cli = Path(sys.executable).with_name("schemathesis")
    async with served(settings) as client:
        document = (await client.get(document_path, headers=headers)).json()
        proc = await asyncio.create_subprocess_exec(
            str(cli), "--config-file", str(CONFIG), "--no-color", "run",
            *[arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")],
            f"{client.base_url}{document_path}", "--max-examples", "50", "--seed", "20261206",
            "--generation-database", "none", "--report-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert one_path in document["paths"]
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-6000:]
    assert "Coverage" in report  # the phases did run
    assert "Fuzzing" in report


async def test_a_method_a_path_does_not_take_is_refused_with_the_methods_it_does(
    settings: Settings,
) -> None:
    """405 with Allow, as RFC 9110 requires, in the API's JSON error shape."""
    async with served(settings) as client:
        events = await client.request("TRACE", "/v1/events")
        decisions = await client.get("/v1/decisions")
    assert events.status_code == decisions.status_code == 405
    assert set(events.headers["allow"].split(", ")) == {"POST", "OPTIONS"}
    assert decisions.headers["allow"] == "POST"
    assert decisions.json() == {"error": "Method Not Allowed", "status": 405}
