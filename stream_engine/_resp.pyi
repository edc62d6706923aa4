from collections.abc import Container, Iterable, Sequence
from typing import Any

def pack_commands(commands: Iterable[Sequence[Any]]) -> bytes: ...
def join_increments(members: dict[str, float], unit: float) -> bytes: ...
def upkeep_due(
    since: dict[str, int],
    expired_at: dict[str, int],
    key: str,
    keep: int,
    increments: int,
    now_ms: int,
    refresh_ms: int,
    max_known: int,
) -> tuple[int, bool]: ...
def aggregate_args(
    keys: list[str],
    args: list[Any],
    increments: dict[str, dict[str, float]],
    prefix: str,
    settled: Container[str],
    since: dict[str, int],
    expired_at: dict[str, int],
    now_ms: int,
    refresh_ms: int,
    max_known: int,
    covisit_keep: int,
    covisit_half_life: str,
    trending_keep: int,
    trending_half_life: str,
    unit: float,
) -> None: ...
