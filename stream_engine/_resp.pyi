from collections.abc import Iterable, Sequence
from typing import Any

def pack_commands(commands: Iterable[Sequence[Any]]) -> bytes: ...
