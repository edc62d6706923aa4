"""The compiled command packer: hiredis's bytes for every argument type, and the same refusals."""

from __future__ import annotations

from typing import Any

import hiredis
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_engine._resp import join_increments, pack_commands
from stream_engine.processor import AggregateUpkeep


def _hiredis(commands: list[tuple[Any, ...]]) -> bytes:
    return b"".join([hiredis.pack_command(c) for c in commands])


def _one(*args: Any) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


ARGS = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"])),  # lone surrogates: UTF-8 refuses them
    st.binary(),
    st.integers(),  # beyond 64 bits too (the slow path)
    st.floats(allow_nan=True, allow_infinity=True),
)
COMMAND = st.tuples(st.sampled_from(["EVALSHA", "HSET", "GET"]), st.lists(ARGS, max_size=12))
COMMANDS = st.lists(COMMAND.map(lambda c: (c[0], *c[1])), max_size=8)


@given(COMMANDS)
def test_the_bytes_are_hiredis_s(commands: list[tuple[Any, ...]]) -> None:
    assert pack_commands(commands) == _hiredis(commands)


@pytest.mark.parametrize(
    "value",
    [0, 9, 10, 99, 100, -1, -10, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**70,
     "", "é", "naïve 東京", b"", b"\x00\r\n", memoryview(b"ab"), 1.5, 1e20, -0.0],
)  # fmt: skip
def test_edge_values_pack_as_hiredis_packs_them(value: Any) -> None:
    assert pack_commands([("SET", "k", value)]) == _one("SET", "k", value)


def test_subclasses_of_str_and_int_pack_as_their_values() -> None:
    class Name(str):
        def __str__(self) -> str:
            return "not this"

    class Count(int):
        pass

    assert pack_commands([("SET", Name("k"), Count(5))]) == _one("SET", "k", 5)


@pytest.mark.parametrize("value", [True, None, np.int64(5), bytearray(b"x"), object(), [1]])
def test_types_hiredis_refuses_are_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        _one("SET", "k", value)
    with pytest.raises(TypeError):
        pack_commands([("SET", "k", "fine"), ("SET", "k", value)])


def test_a_lone_surrogate_is_refused_as_utf_8_refuses_it() -> None:
    with pytest.raises(UnicodeEncodeError):
        _one("SET", "k", "\ud800")
    with pytest.raises(UnicodeEncodeError):
        pack_commands([("SET", "k", "\ud800")])


def test_a_command_without_a_name_is_refused_and_no_commands_are_no_bytes() -> None:
    with pytest.raises(ValueError, match="needs at least its name"):
        pack_commands([("GET", "k"), ()])
    assert pack_commands([]) == b""
    assert pack_commands([["GET", "k"]]) == _one("GET", "k")


def _joined(members: dict[str, float], unit: float) -> bytes:
    """What join_increments replaced (processor._queue_aggregate), encoded."""
    text = " ".join([f"{m} {n}" for m, inc in members.items() if (n := int(inc * unit + 0.5))])
    return text.encode()


MEMBER = st.text(st.characters(exclude_categories=["Cs", "Zs", "Cc"]), min_size=1, max_size=12)


@given(st.dictionaries(MEMBER, st.floats(-1e9, 1e12, allow_nan=False)), st.sampled_from([1, 1000]))
def test_increments_are_joined_in_whole_units_as_python_rounds_them(
    members: dict[str, float], unit: int
) -> None:
    assert join_increments(members, unit) == _joined(members, unit)


def test_increments_that_round_to_none_are_left_out_and_bad_ones_refused() -> None:
    members = {"a": 0.0004, "b": 0.0005, "c": 1.2345, "d": -0.0004, "e": -0.0016}
    assert join_increments(members, 1000) == b"b 1 c 1235 e -1"
    assert join_increments({"a": 0.0001}, 1000) == b""
    with pytest.raises(ValueError, match="not a number"):
        join_increments({"a": float("nan")}, 1000)
    with pytest.raises(OverflowError):
        join_increments({"a": float("inf")}, 1000)


SUFFIX = st.one_of(st.builds(lambda m: f"cv:{m}", MEMBER), st.sampled_from(["tr", "tr:Home"]))


@given(
    st.lists(st.dictionaries(SUFFIX, st.dictionaries(MEMBER, st.floats(0, 1e6), min_size=1)),
             min_size=1, max_size=4),
    st.sets(SUFFIX, max_size=3),
)  # fmt: skip
def test_an_aggregate_write_s_arguments_are_the_python_loop_s(
    writes: list[dict[str, dict[str, float]]], settled: set[str]
) -> None:
    """The compiled per-set loop against the loop it replaced, write after write (the
    schedule carries over), on two schedules started alike."""
    fast, slow = AggregateUpkeep(86_400_000, 1_000), AggregateUpkeep(86_400_000, 1_000)
    for n, increments in enumerate(writes):
        now = 700 * n
        keys: list[str] = []
        args: list[Any] = []
        fast.queue(keys, args, increments, "P:{agg}:", settled, now, (50, "60000"), (1000, "9"))
        want_keys: list[str] = []
        want_args: list[Any] = []
        for suffix, members in increments.items():
            want_keys.append("P:{agg}:" + suffix)
            keep, half = (50, "60000") if suffix.startswith("cv:") else (1000, "9")
            check, expire = slow.due(want_keys[-1], keep, len(members), now)
            want_args += [check, "1" if expire else "0", "" if suffix in settled else half,
                          _joined(members, 1000)]  # fmt: skip
        assert (keys, args) == (want_keys, want_args)
