"""Run the decision API: `python -m api` (KAIROS_API_HOST, KAIROS_API_PORT, KAIROS_*).

    python -m api                         serve
    python -m api report [--minutes 60] [--json]   the zero-to-zero report, from Redis

A bad setting, config file or catalog path stops it before it listens, with one line that
says what is wrong (exit code 2).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import uvicorn
from redis.exceptions import RedisError

from api.app import DEMO_CONFIG, create_app
from api.config import load_config
from api.report import MAX_REPORT_MINUTES
from api.server import server_options
from api.settings import Settings
from stream_engine.cli_args import whole_number
from stream_engine.demo_catalog import resolve_catalog_path
from stream_engine.exceptions import KairosError
from stream_engine.logs import configure
from stream_engine.store import check_topology


async def _report(settings: Settings, minutes: int, as_json: bool) -> None:
    import time

    import orjson

    from api.report import Window, build_report, read_counters, render_table
    from stream_engine.store import Batches, connect

    config = load_config(Path(settings.config_path) if settings.config_path else DEMO_CONFIG)
    redis = connect(settings.redis_url, timeout_s=5.0)
    batches = Batches(redis)
    try:
        window = Window(minutes, int(time.time() * 1000))
        totals, series, counts = await read_counters(batches.execute, settings.key_prefix, window)
    finally:
        await batches.aclose()
        await redis.aclose()
    report = build_report(config, totals, series, counts, window)
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_table(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api")
    sub = parser.add_subparsers(dest="command")
    rep = sub.add_parser("report", help="print the zero-to-zero report")
    rep.add_argument(
        "--minutes",
        type=whole_number(1, MAX_REPORT_MINUTES),
        default=60,
        help="the window: what /admin/report?minutes= takes",
    )
    rep.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "report":
        try:
            settings = Settings.from_env(os.environ)
            check_topology(settings.redis_url)
            asyncio.run(_report(settings, args.minutes, args.json))
        except (KairosError, OSError, RedisError) as exc:
            print(f"api report: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        settings = Settings.from_env(os.environ)
        check_topology(settings.redis_url)  # a Redis down now is an outage: served through
        load_config(Path(settings.config_path) if settings.config_path else DEMO_CONFIG)
        catalog = resolve_catalog_path(settings.catalog_path, settings.stack_dir)
        if not catalog.exists():
            raise KairosError(f"{catalog}: catalog file not found (KAIROS_CATALOG_PATH)")
    except KairosError as exc:
        print(f"api: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_format, settings.log_level)
    uvicorn.run(
        create_app(settings), host=settings.api_host, port=settings.api_port,
        **server_options(settings),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
