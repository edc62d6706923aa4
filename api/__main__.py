"""Run the decision API: `python -m api` (KAIROS_API_HOST, KAIROS_API_PORT, KAIROS_*)."""

from __future__ import annotations

import os
import sys

import uvicorn

from api.app import create_app
from api.settings import Settings
from stream_engine.exceptions import ConfigError


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"api: bad setting: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
