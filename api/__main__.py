"""Run the decision API: `python -m api` (KAIROS_API_HOST, KAIROS_API_PORT, KAIROS_*).

A bad setting, config file or catalog path stops it before it listens, with one line that
says what is wrong (exit code 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn

from api.app import DEMO_CONFIG, create_app
from api.config import load_config
from api.settings import Settings
from stream_engine.demo_catalog import resolve_catalog_path
from stream_engine.exceptions import KairosError
from stream_engine.logs import configure


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
        load_config(Path(settings.config_path) if settings.config_path else DEMO_CONFIG)
        catalog = resolve_catalog_path(settings.catalog_path, settings.stack_dir)
        if not catalog.exists():
            raise KairosError(f"{catalog}: catalog file not found (KAIROS_CATALOG_PATH)")
    except KairosError as exc:
        print(f"api: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_format, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        # Work per request that nobody here reads: X-Forwarded-* rewriting (no proxy in
        # front by default) and the Server and Date headers.
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
