from collections.abc import Container

import numpy as np
import numpy.typing as npt

def score_parts(
    matrix: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    interest: npt.NDArray[np.float32] | None,
    covis_rows: npt.NDArray[np.int64],
    covis_scores: npt.NDArray[np.float32],
    prior: npt.NDArray[np.float32],
    leaf: npt.NDArray[np.int64],
    leaf_shares: dict[int, float],
    w_interest: float,
    w_covis: float,
    w_trend: float,
    w_leaf: float,
) -> npt.NDArray[np.float32]: ...
def walk(
    rows: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    allowed: npt.NDArray[np.uint8],
    weight: npt.NDArray[np.float32] | None,
    sensitive: npt.NDArray[np.uint8] | None,
    leaf: npt.NDArray[np.int64],
    n_leaves: int,
    blocked: Container[int],
    taken: set[int],
    cap: int,
    no_leaf: int,
    wanted: int,
) -> list[tuple[int, int]]: ...
def union_sorted(parts: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]: ...
def merge_weighted(
    sources: list[tuple[float, tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def top_dims(
    values: npt.NDArray[np.float32],
    dims: npt.NDArray[np.int64],
    depth: npt.NDArray[np.int64],
    k: int,
) -> list[int]: ...
def or_bits(bits: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64] | list[int]) -> int: ...
def unit_f32(v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32] | None: ...
def parts_at(table: npt.NDArray[np.float32], positions: list[int]) -> list[list[float]]: ...
def members(
    reply: list[object] | None, row_of: dict[str, int], scored: bool
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
