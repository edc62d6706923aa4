"""The publisher's partitioning: a session's events and exposures go where aiokafka's (and the
Java client's) default partitioner puts them, whoever produced them. No services involved."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from api import _kernels
from api.publisher import partition_of


@given(st.binary(max_size=80))
def test_compiled_murmur2_is_kafkas(key: bytes) -> None:
    assert _kernels.murmur2(key) == murmur2(key)


@given(st.binary(min_size=1, max_size=40) | st.text(max_size=30).map(str.encode),
       st.integers(1, 64))  # fmt: skip
def test_keys_go_to_the_default_partitioners_partition(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_of(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


def test_a_key_without_bytes_still_gets_a_partition() -> None:
    assert partition_of(None, [0, 1, 2]) in (0, 1, 2)
    assert partition_of(b"", [3]) == 3
