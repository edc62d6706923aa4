# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled loops of a decision.

Each replaced a handful of numpy calls on a few hundred candidates, where numpy's per-call
cost (argument checks, temporaries, dtype dispatch) was most of the time. The arithmetic is
the numpy code's, in the same float32 steps (compiled with -ffp-contract=off, so no fused
multiply-adds change the rounding); only the interest dot product sums in another order
than BLAS, which moves a score by at most a few units in the last place.
Typing stubs: _kernels.pyi. Built by setuptools with Cython (pyproject.toml).
"""

import numpy as np

from cpython.bytes cimport PyBytes_AS_STRING
from libc.math cimport sqrt
from libc.stdlib cimport strtod
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

# Work arrays with an entry per catalog row, zero between calls: a call writes the few
# hundred rows it touches and sets them back before it returns, instead of allocating a
# catalog-sized array per decision (at 100k items that costs more than the scoring). One
# set per process: decisions run one at a time on the event loop.
cdef double[::1] _sums = np.zeros(0, np.float64)  # co-visitation per row
cdef uint8_t[::1] _seen = np.zeros(0, np.uint8)  # rows already in a union
# Per leaf category: how many items of it a walk took (zero between calls).
cdef int32_t[::1] _taken_per_leaf = np.zeros(0, np.int32)


cdef void _scratch_for(Py_ssize_t size):
    global _sums, _seen
    if _seen.shape[0] < size:
        size = max(size, 2 * _seen.shape[0])
        _sums = np.zeros(size, np.float64)
        _seen = np.zeros(size, np.uint8)


cdef int32_t[::1] _per_leaf(Py_ssize_t size):
    global _taken_per_leaf
    if _taken_per_leaf.shape[0] < size:
        _taken_per_leaf = np.zeros(max(size, 2 * _taken_per_leaf.shape[0]), np.int32)
    return _taken_per_leaf


def score_parts(
    const float[:, ::1] matrix,
    const int64_t[::1] rows,
    object interest,
    const int64_t[::1] covis_rows,
    const float[::1] covis_scores,
    const float[::1] prior,
    const int64_t[::1] leaf,
    dict leaf_shares,
    float w_interest,
    float w_covis,
    float w_trend,
    float w_leaf,
):
    """A (5, n) float32 array: total, interest, covis, trend and leaf of every candidate."""
    cdef Py_ssize_t n = rows.shape[0], d = matrix.shape[1], nc = covis_rows.shape[0]
    cdef Py_ssize_t n_prior = prior.shape[0], n_rows = matrix.shape[0]
    cdef Py_ssize_t i, j, q, m = 0
    cdef int64_t r, lf
    cdef float acc, share, total
    cdef float part[8]  # eight running sums of the dot product
    cdef int64_t keys[16]
    cdef float shares[16]
    cdef const float[::1] v
    cdef bint personal = interest is not None
    cdef Py_ssize_t nnz = 0, t
    out = np.empty((5, n), np.float32)
    cdef float[:, ::1] o = out
    nonzero = np.empty(d, np.intp)
    cdef Py_ssize_t[::1] nz = nonzero
    if personal:
        v = interest
        if v.shape[0] != d:
            raise ValueError(f"interest has {v.shape[0]} dimensions, the catalog {d}")
        # A session's interest has a few non-zero dimensions (5 of 70 in the demo): only
        # those enter the dot products. Each still goes to running sum j % 8, so the sums
        # are those of the dense loop (skipping adds of exact zeros).
        for j in range(d):
            if v[j] != 0:
                nz[nnz] = j
                nnz += 1
    for key, value in leaf_shares.items():
        if m == 16:  # more recent leaves than RECENCY weights: never, but stay in bounds
            break
        keys[m] = key
        shares[m] = value
        m += 1
    if leaf.shape[0] < n_rows:
        raise ValueError("leaf has fewer rows than the matrix")
    if covis_scores.shape[0] != nc:
        raise ValueError(f"{covis_scores.shape[0]} co-visitation scores for {nc} rows")
    for i in range(nc):
        if covis_rows[i] < 0 or covis_rows[i] >= n_rows:
            raise IndexError(f"co-visited row {covis_rows[i]} outside the catalog")
    _scratch_for(n_rows)
    cdef double[::1] dense = _sums  # float32 -> float64 -> float32: exact
    for i in range(nc):
        dense[covis_rows[i]] = covis_scores[i]
    try:
        for i in range(n):
            r = rows[i]
            if r < 0 or r >= n_rows:
                raise IndexError(f"candidate row {r} outside the catalog")
            acc = 0
            if personal:
                for q in range(8):
                    part[q] = 0
                for t in range(nnz):
                    j = nz[t]
                    part[j & 7] += matrix[r, j] * v[j]
                for q in range(8):
                    acc += part[q]
            o[1, i] = acc
            o[2, i] = <float>dense[r]
            o[3, i] = prior[r] if r < n_prior else 0
            lf = leaf[r]
            share = 0
            for q in range(m):
                if keys[q] == lf:
                    share = shares[q]
                    break
            o[4, i] = share
            # numpy's order: total = w·interest, then += w·covis, += w·trend, += w·leaf
            total = w_interest * acc
            total = total + w_covis * o[2, i]
            total = total + w_trend * o[3, i]
            total = total + w_leaf * share
            o[0, i] = total
    finally:
        for i in range(nc):
            dense[covis_rows[i]] = 0
    return out


def walk(
    const int64_t[::1] rows,
    const float[::1] scores,
    const uint8_t[::1] allowed,
    object weight,
    object sensitive,
    const int64_t[::1] leaf,
    Py_ssize_t n_leaves,
    object blocked,
    set taken,
    Py_ssize_t cap,
    int64_t no_leaf,
    Py_ssize_t wanted,
):
    """The candidates to serve, best first: [(row, index among the candidates), ...].

    A candidate is skipped when its row is not `allowed` (or is `sensitive`), is in
    `blocked` or `taken`, or its leaf category already has `cap` items; its score is
    multiplied by its row's `weight` first. Ties go to the lower index (rows sorted: the
    lower row), as a stable sort of the scores, descending, orders them. Adds the rows it
    returns to `taken`."""
    cdef Py_ssize_t n = rows.shape[0], i, k = 0, kept, found = 0
    cdef Py_ssize_t n_rows = allowed.shape[0]
    cdef int64_t r, lf, key
    cdef int32_t bits
    cdef float s
    cdef const float[::1] w
    cdef const uint8_t[::1] sens
    cdef bint weighted = weight is not None, checked = sensitive is not None
    out = []
    if wanted <= 0 or n == 0:
        return out
    if weighted:
        w = weight
        if w.shape[0] < n_rows:
            raise ValueError("weight has fewer rows than allowed")
    if checked:
        sens = sensitive
        if sens.shape[0] < n_rows:
            raise ValueError("sensitive has fewer rows than allowed")
    if scores.shape[0] != n:
        raise ValueError(f"{scores.shape[0]} scores for {n} candidates")
    if leaf.shape[0] < n_rows:
        raise ValueError("leaf has fewer rows than allowed")
    order = np.empty(n, np.int64)
    cdef int64_t[::1] o = order
    for i in range(n):
        r = rows[i]
        if r < 0:
            raise IndexError(f"candidate row {r}")
        if r >= n_rows or not allowed[r] or (checked and sens[r]):  # newer than the rules
            continue
        s = scores[i]
        if weighted:
            s = s * w[r]
        # The order-preserving integer of -s (IEEE-754 bits, negatives' magnitude flipped;
        # + 0 turns -0.0 into 0.0) in the high half, the index in the low half.
        s = -s + <float>0.0
        bits = (<int32_t*>&s)[0]
        key = <int64_t>bits
        key ^= (key >> 31) & 0x7FFFFFFF
        o[k] = (key << 32) | i
        k += 1
    kept = k
    order = order[:kept]
    order.sort()
    o = order
    cdef int32_t[::1] per_leaf = _per_leaf(n_leaves)
    touched = []
    try:
        for k in range(kept):
            i = o[k] & 0xFFFFFFFF
            r = rows[i]
            lf = leaf[r]
            if lf != no_leaf:
                if lf < 0 or lf >= n_leaves:
                    raise IndexError(f"leaf category {lf} of row {r} unknown")
                if per_leaf[lf] >= cap:
                    continue
            row = r
            if row in taken or row in blocked:
                continue
            if lf != no_leaf:
                if per_leaf[lf] == 0:
                    touched.append(lf)
                per_leaf[lf] += 1
            taken.add(row)
            out.append((row, i))
            found += 1
            if found == wanted:
                break
    finally:
        for lf in touched:
            per_leaf[lf] = 0
    return out


cdef int64_t _max_row(list parts) except -2:
    cdef int64_t top = -1, r
    cdef const int64_t[::1] rows
    cdef Py_ssize_t i
    for part in parts:
        rows = part
        for i in range(rows.shape[0]):
            r = rows[i]
            if r < 0:
                raise IndexError(f"row {r}")
            if r > top:
                top = r
    return top


def union_sorted(list parts):
    """The sorted union of a few small int64 row arrays."""
    cdef Py_ssize_t total = 0, i, k = 0
    cdef const int64_t[::1] rows
    cdef int64_t r
    for part in parts:
        total += len(part)
    _scratch_for(_max_row(parts) + 1)  # every row checked before the scratch is written
    cdef uint8_t[::1] seen = _seen
    out = np.empty(total, np.int64)
    cdef int64_t[::1] o = out
    for part in parts:
        rows = part
        for i in range(rows.shape[0]):
            r = rows[i]
            if not seen[r]:
                seen[r] = 1
                o[k] = r
                k += 1
    for i in range(k):
        seen[o[i]] = 0
    out = out[:k]
    out.sort()
    return out


def merge_weighted(list sources):
    """Co-visitation of recent items: [(weight, (rows, scores)), ...] (the rows of one source
    distinct) -> (the sorted union of their rows, the weighted sums of their scores over
    the largest sum). numpy's arithmetic: each product in float32, summed in float64 in
    source order, divided in float64, rounded to float32."""
    cdef Py_ssize_t i, k
    cdef const int64_t[::1] rows
    cdef const float[::1] scores
    cdef float w
    cdef double top = 0
    for _, nb in sources:
        scores = nb[1]  # float32, or a TypeError before anything is written
        if scores.shape[0] != len(nb[0]):
            raise ValueError(f"{scores.shape[0]} scores for {len(nb[0])} rows")
    union = union_sorted([nb[0] for _, nb in sources])  # checks every row, sizes the scratch
    cdef const int64_t[::1] u = union
    k = u.shape[0]
    cdef double[::1] sums = _sums
    for weight, nb in sources:
        w = weight
        rows, scores = nb[0], nb[1]
        for i in range(rows.shape[0]):
            sums[rows[i]] += <double>(w * scores[i])
    out = np.empty(k, np.float32)
    cdef float[::1] o = out
    for i in range(k):
        if sums[u[i]] > top:
            top = sums[u[i]]
    for i in range(k):
        o[i] = <float>(sums[u[i]] / top) if top > 0 else <float>sums[u[i]]
        sums[u[i]] = 0
    return union, out


def top_dims(const float[::1] values, const int64_t[::1] dims, const int64_t[::1] depth,
             Py_ssize_t k):
    """Indices into `dims` of the k largest positive values[dims[i]], deepest first on a
    tie, then the lower index: the first k of a lexsort by (-value, -depth), positives only."""
    cdef Py_ssize_t n = dims.shape[0], i, j, best
    cdef float v, bv
    out = []
    if depth.shape[0] != n:
        raise ValueError(f"{depth.shape[0]} depths for {n} dimensions")
    for i in range(n):
        if dims[i] < 0 or dims[i] >= values.shape[0]:
            raise IndexError(f"dimension {dims[i]} of a {values.shape[0]}-vector")
    for j in range(k):
        best = -1
        bv = 0
        for i in range(n):
            if i in out:
                continue
            v = values[dims[i]]
            if v > 0 and (best < 0 or v > bv or (v == bv and depth[i] > depth[best])):
                best, bv = i, v
        if best < 0:
            break
        out.append(best)
    return out


def or_bits(const uint64_t[::1] bits, rows):
    """The OR of bits[r] over the rows (an int64 array or a list of ints)."""
    cdef uint64_t out = 0
    cdef Py_ssize_t n = bits.shape[0], i
    cdef int64_t r
    cdef const int64_t[::1] arr
    if isinstance(rows, list):
        for row in rows:
            r = row
            if r < 0 or r >= n:
                raise IndexError(f"row {r} of {n}")
            out |= bits[r]
        return out
    arr = rows
    for i in range(arr.shape[0]):
        r = arr[i]
        if r < 0 or r >= n:
            raise IndexError(f"row {r} of {n}")
        out |= bits[r]
    return out


def unit_f32(const float[::1] v):
    """v / |v| as float32 (the norm summed in float64), or None when |v| <= 1e-9."""
    cdef Py_ssize_t n = v.shape[0], i
    cdef double acc = 0
    cdef float norm
    for i in range(n):
        acc += <double>v[i] * v[i]
    if not acc > 1e-18:  # also NaN
        return None
    norm = <float>sqrt(acc)
    out = np.empty(n, np.float32)
    cdef float[::1] o = out
    for i in range(n):
        o[i] = v[i] / norm
    return out


def parts_at(const float[:, ::1] table, list positions):
    """[interest, covis, trend, leaf] of the candidates at `positions` (rows 1-4 of a
    score_parts table), as Python floats."""
    cdef Py_ssize_t n = table.shape[1], i
    out = []
    if table.shape[0] != 5:
        raise ValueError(f"a score table has 5 rows, not {table.shape[0]}")
    for pos in positions:
        i = pos
        if i < 0 or i >= n:
            raise IndexError(f"candidate {i} of {n}")
        out.append([table[1, i], table[2, i], table[3, i], table[4, i]])
    return out


cdef double _text_float(bytes text) except? -1.0:
    cdef char* start = PyBytes_AS_STRING(text)
    cdef char* end
    cdef double v = strtod(start, &end)
    if end == start or end - start != len(text):
        raise ValueError(f"not a score: {text!r}")
    return v


def members(list reply, dict row_of, bint scored):
    """A sorted-set reply from Redis (ZREVRANGE, with or without WITHSCORES; RESP2's flat
    member, score, ... list or RESP3's [member, score] pairs) as (rows, scores): the members
    that `row_of` (item id -> row) knows, in reply order, as int64 rows, and their scores
    as float64 (zeros without `scored`). Members unknown to the catalog are skipped. The
    co-visitation refresh reads a few hundred of these a second: in Python each cost
    ~20 µs of the event loop."""
    cdef Py_ssize_t n, i, k = 0, step
    if not reply:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    pairs = scored and isinstance(reply[0], list)
    step = 1 if pairs or not scored else 2
    n = len(reply) // step
    if scored and not pairs and len(reply) % 2:
        raise ValueError(f"a WITHSCORES reply of {len(reply)} entries")
    rows = np.empty(n, np.int64)
    scores = np.zeros(n, np.float64)
    cdef int64_t[::1] r = rows
    cdef double[::1] s = scores
    for i in range(n):
        if pairs:
            member, score = reply[i]
        else:
            member = reply[i * step]
            score = reply[i * step + 1] if scored else None
        found = row_of.get(member.decode() if isinstance(member, bytes) else member)
        if found is None:
            continue
        r[k] = found
        if scored:
            if isinstance(score, bytes):  # RESP2: Redis's text ("12.5", "inf"); bytes
                s[k] = _text_float(score)  # objects end in a NUL
            else:
                s[k] = score if isinstance(score, float) else float(score)
        k += 1
    return rows[:k], scores[:k]
