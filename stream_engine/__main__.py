"""Command line of the stream engine.

python -m stream_engine worker                 run a stream worker (KAIROS_* settings)
python -m stream_engine attribution            attribute clicks to decisions (the report)
python -m stream_engine topics                 create the topics if missing
python -m stream_engine catalog --out F [--items N] [--seed S]   write a demo catalog
python -m stream_engine erase (--user U | --session S)           erase state now
python -m stream_engine latent [--once]        learn item embeddings from co-visitation
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import uvloop
from redis.exceptions import RedisError

from stream_engine.cli_args import whole_number
from stream_engine.events import ID_PATTERN
from stream_engine.exceptions import ConfigError, KairosError
from stream_engine.logs import configure
from stream_engine.settings import Settings
from stream_engine.store import check_topology


def _catalog_path(settings: Settings) -> Path:
    from stream_engine.demo_catalog import resolve_catalog_path

    return resolve_catalog_path(settings.catalog_path, os.environ.get("KAIROS_STACK_DIR", ".stack"))


def cmd_worker(settings: Settings) -> None:
    from prometheus_client import start_http_server

    from stream_engine.catalog import Catalog
    from stream_engine.heap import freeze_startup_heap
    from stream_engine.metrics import WorkerMetrics
    from stream_engine.topics import ensure_topics_waiting

    catalog = Catalog.from_file(_catalog_path(settings))
    asyncio.run(ensure_topics_waiting(settings))
    metrics = WorkerMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    if settings.engine in ("aiokafka", "librdkafka"):
        from stream_engine.consumer import ClickstreamConsumer, run_forever

        engine: Any = ClickstreamConsumer
        if settings.engine == "librdkafka":
            from stream_engine.rdkafka_consumer import RdKafkaConsumer

            engine = RdKafkaConsumer
        freeze_startup_heap()  # with the consumer's libraries loaded
        run_forever(settings, catalog, metrics, engine)
        return
    # faust only for its engine; its app freezes the heap once its services have started
    from stream_engine.app import create_app, make_worker

    # faust runs on whatever loop the policy makes: the agent and its consumer (one loop:
    # stream_engine/faust_transport.py) on uvloop, like every other Kairos process
    # (asyncio's Python selector loop was a third of the worker's CPU at 1,000 events/s;
    # loadtest/JOURNAL.md, session 14).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    worker = make_worker(create_app(settings, catalog, metrics), settings)
    worker.execute_from_commandline()  # runs until SIGTERM/SIGINT, then exits the process


def cmd_attribution(settings: Settings) -> None:
    from stream_engine.attribution import run_forever
    from stream_engine.catalog import Catalog
    from stream_engine.topics import ensure_topics_waiting

    catalog = Catalog.from_file(_catalog_path(settings))
    asyncio.run(ensure_topics_waiting(settings))
    run_forever(settings, catalog)


def cmd_erase(settings: Settings, user: str | None, session: str | None) -> int:
    from stream_engine.erasure import erase_session, erase_user
    from stream_engine.state import Keys
    from stream_engine.store import connect

    async def run() -> None:
        redis = connect(settings.redis_url)
        keys, ttl = Keys(settings.key_prefix), settings.erasure_ttl_s * 1000
        try:
            if user:
                sessions = await erase_user(redis, keys, user, ttl)
                print(f"erased user {user} and {len(sessions)} session(s)")
            if session:
                await erase_session(redis, keys, session, ttl)
                print(f"erased session {session}")
        finally:
            await redis.aclose()

    try:
        asyncio.run(run())
    except (RedisError, OSError) as exc:
        print(f"stream_engine erase: Redis failed ({exc}); what was erased stays erased, "
              "and erasing again is safe: run it again once Redis answers",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_latent(settings: Settings, once: bool) -> int:
    """The learner: one per deployment. Idle (exit 0) when the catalog ships embeddings."""
    import signal

    from stream_engine.catalog import Catalog
    from stream_engine.latent import run_learner
    from stream_engine.store import connect

    space = Catalog.from_file(_catalog_path(settings)).space
    if not space.learned:
        print("stream_engine latent: the catalog ships embeddings; nothing to learn")
        return 0

    async def run() -> int:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        redis = connect(settings.redis_url, max_connections=2, timeout_s=30.0)
        try:
            return await run_learner(
                redis, settings.key_prefix, space.latent_dims, settings.latent_max_items,
                settings.aggregate_ttl_s * 1000, settings.covisit_half_life_s * 1000,
                settings.latent_refresh_s, once, stopping,
            )  # fmt: skip
        finally:
            await redis.aclose()

    version = asyncio.run(run())
    if once:
        print(f"latent model version {version}" if version else "too little co-visitation yet")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream_engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run a stream worker")
    sub.add_parser("attribution", help="attribute clicks to decisions; feeds the report")
    sub.add_parser("topics", help="create the Kairos topics if missing")
    cat = sub.add_parser("catalog", help="write a demo catalog (JSONL)")
    cat.add_argument("--out", type=Path, required=True)
    cat.add_argument("--items", type=whole_number(1), default=10_000)
    cat.add_argument("--seed", type=int, default=7)
    erase = sub.add_parser("erase", help="erase a user's or a session's state now")
    erase.add_argument("--user")
    erase.add_argument("--session")
    latent = sub.add_parser("latent", help="learn item embeddings from co-visitation")
    latent.add_argument("--once", action="store_true", help="learn and publish once, then exit")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
        if args.command in ("worker", "attribution", "latent", "erase"):
            check_topology(settings.redis_url)  # a Redis down now is an outage: retried
    except ConfigError as exc:
        print(f"stream_engine: bad setting: {exc}", file=sys.stderr)
        return 2
    if args.command == "erase":
        if not (args.user or args.session):
            parser.error("erase needs --user or --session")
        for name, value in (("--user", args.user), ("--session", args.session)):
            if value is not None and not ID_PATTERN.fullmatch(value):
                parser.error(f"{name} must be 1-128 characters of [A-Za-z0-9._:@-]")
    configure(settings.log_format, settings.log_level)
    try:
        return _run(args, settings)
    except KairosError as exc:  # a catalog file missing or malformed
        print(f"stream_engine {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "attribution":
        cmd_attribution(settings)
        return 0
    if args.command == "latent":
        return cmd_latent(settings, args.once)
    if args.command == "worker":
        cmd_worker(settings)
        return 0
    if args.command == "topics":
        from aiokafka.errors import KafkaError

        from stream_engine.topics import ensure_topics

        try:
            created = asyncio.run(ensure_topics(settings))
        except KafkaError as exc:
            print(f"stream_engine topics: Kafka at {settings.kafka_bootstrap}: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"created: {', '.join(created)}" if created else "every topic exists")
        return 0
    if args.command == "catalog":
        from stream_engine.demo_catalog import write_demo_catalog

        print(write_demo_catalog(args.out, args.items, args.seed))
        return 0
    return cmd_erase(settings, args.user, args.session)


if __name__ == "__main__":
    # faust's Worker parses sys.argv itself; hand it only the program name.
    argv = sys.argv[1:]
    sys.argv = sys.argv[:1]
    sys.exit(main(argv))
