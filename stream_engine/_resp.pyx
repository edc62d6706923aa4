# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The worker's Redis writes built in C: commands packed as RESP in one pass over their
arguments (`pack_commands`), and an aggregate write's per-set arguments (`aggregate_args`,
with AggregateUpkeep's schedule, `upkeep_due`, and the joined increments,
`join_increments`).

A worker batch is ~40 commands and ~1,900 arguments (an aggregate write is one EVALSHA of
~90), and hiredis's `pack_command` takes 75-175 ns an argument (an int is formatted
through a Python string): ~220 µs a 30-event batch, 9% of the faust worker's samples at
5,000 events/s (loadtest/README.md, session 24). Here the exact types the worker sends
(str, bytes, int) are copied straight into one buffer; anything else takes hiredis's rules
(float as repr, memoryview as its bytes; bool and other types refused).
Typing stubs: _resp.pyi. Built by setuptools with Cython (pyproject.toml).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1


cdef inline Py_ssize_t _digits(unsigned long long v) noexcept:
    cdef Py_ssize_t n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline char* _put_uint(char* p, unsigned long long v, Py_ssize_t n) noexcept:
    """Writes v's n decimal digits at p; returns the end."""
    cdef char* q = p + n
    while True:
        q -= 1
        q[0] = <char>(48 + v % 10)
        v //= 10
        if v == 0:
            break
    return p + n


cdef inline Py_ssize_t _int_size(long long v) noexcept:
    if v < 0:
        return 1 + _digits(<unsigned long long>(-(v + 1)) + 1)
    return _digits(<unsigned long long>v)


cdef inline char* _put_int(char* p, long long v, Py_ssize_t k) noexcept:
    """Writes v's k characters (_int_size) at p, a sign first if negative; returns the end."""
    if v < 0:
        p[0] = 45  # -
        _put_uint(p + 1, <unsigned long long>(-(v + 1)) + 1, k - 1)
    else:
        _put_uint(p, <unsigned long long>v, k)
    return p + k


cdef inline Py_ssize_t _bulk_size(Py_ssize_t n) noexcept:
    return 1 + _digits(<unsigned long long>n) + 2 + n + 2  # $<n>\r\n<data>\r\n


cdef inline char* _put_header(char* p, char mark, Py_ssize_t n) noexcept:
    p[0] = mark
    p = _put_uint(p + 1, <unsigned long long>n, _digits(<unsigned long long>n))
    p[0] = 13
    p[1] = 10
    return p + 2


cdef bint _plain(tuple command):
    """Only str, bytes and ints that fit in 64 bits (the fast path)."""
    cdef int overflow
    for arg in command:
        if type(arg) is str or type(arg) is bytes:
            continue
        if type(arg) is int:
            PyLong_AsLongLongAndOverflow(arg, &overflow)
            if overflow == 0:
                continue
        return False
    return True


cdef tuple _normalized(tuple command):
    """The command with every argument as str or bytes, by hiredis's rules."""
    out = []
    for arg in command:
        if type(arg) is str or type(arg) is bytes:
            out.append(arg)
        elif isinstance(arg, bool):
            raise TypeError("A tuple item must be str, int, float or bytes.")
        elif isinstance(arg, int):
            out.append(str(int(arg)))
        elif isinstance(arg, float):
            out.append(repr(float(arg)))
        elif isinstance(arg, str):  # a subclass: its characters, whatever its __str__
            out.append(str.encode(arg))
        elif isinstance(arg, bytes):
            out.append(bytes(arg))
        elif isinstance(arg, memoryview):
            out.append(arg.tobytes())
        else:
            raise TypeError("A tuple item must be str, int, float or bytes.")
    return tuple(out)


def pack_commands(commands):
    """The commands (a sequence of tuples of arguments, the command name first) as one
    RESP byte string, the same bytes as joining `hiredis.pack_command` of each."""
    cdef list todo = []
    cdef Py_ssize_t total = 0, n, k
    cdef long long v
    cdef int overflow
    cdef const char* data
    cdef tuple command
    for c in commands:
        command = c if type(c) is tuple else tuple(c)
        if not _plain(command):
            command = _normalized(command)
        if len(command) == 0:
            raise ValueError("a Redis command needs at least its name")
        todo.append(command)
        total += 1 + _digits(<unsigned long long>len(command)) + 2
        for arg in command:
            if type(arg) is str:
                PyUnicode_AsUTF8AndSize(arg, &n)
            elif type(arg) is bytes:
                n = PyBytes_GET_SIZE(arg)
            else:
                n = _int_size(PyLong_AsLongLongAndOverflow(arg, &overflow))
            total += _bulk_size(n)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    cdef char* end = p + total
    for command in todo:
        p = _put_header(p, 42, len(command))  # *
        for arg in command:
            if type(arg) is str:
                data = PyUnicode_AsUTF8AndSize(arg, &n)
                p = _put_header(p, 36, n)  # $
                memcpy(p, data, n)
                p += n
            elif type(arg) is bytes:
                n = PyBytes_GET_SIZE(arg)
                p = _put_header(p, 36, n)
                memcpy(p, PyBytes_AS_STRING(arg), n)
                p += n
            else:
                v = PyLong_AsLongLongAndOverflow(arg, &overflow)
                k = _int_size(v)
                p = _put_int(_put_header(p, 36, k), v, k)
            p[0] = 13
            p[1] = 10
            p += 2
    if p != end:
        raise AssertionError("RESP packing miscounted its buffer")
    return out


def join_increments(dict members, double unit):
    """See _join_increments."""
    return _join_increments(members, unit)


cdef bytes _join_increments(dict members, double unit):
    """An aggregate write's "member units member units ..." argument (state.APPLY_AGGREGATES)
    as bytes: each increment in whole units, int(increment * unit + 0.5), and members that
    round to none left out. The same text as joining f"{member} {units}" in Python, which
    was ~4% of a batch's CPU."""
    cdef Py_ssize_t total = 0, n
    cdef double x
    cdef long long units
    cdef const char* data
    for member, inc in members.items():  # the size first; the same rules again below
        x = inc * unit + 0.5
        if x != x:
            raise ValueError(f"an aggregate increment is not a number: {inc!r}")
        if -1.0 < x < 1.0:  # rounds to none (int() truncates toward zero)
            continue
        if not -9.0e18 < x < 9.0e18:
            raise OverflowError(f"an aggregate increment too large to count: {inc!r}")
        PyUnicode_AsUTF8AndSize(member, &n)
        total += n + 1 + _int_size(<long long>x) + 1
    if total == 0:
        return b""
    out = PyBytes_FromStringAndSize(NULL, total - 1)
    cdef char* p = PyBytes_AS_STRING(out)
    for member, inc in members.items():
        x = inc * unit + 0.5
        if -1.0 < x < 1.0:
            continue
        if p != PyBytes_AS_STRING(out):
            p[0] = 32
            p += 1
        data = PyUnicode_AsUTF8AndSize(member, &n)
        memcpy(p, data, n)
        p[n] = 32
        units = <long long>x
        p = _put_int(p + n + 1, units, _int_size(units))
    if p != PyBytes_AS_STRING(out) + total - 1:
        raise AssertionError("increments miscounted their buffer")
    return out


cdef long _due(dict since, dict expired_at, str key, long keep, long increments,
               long long now_ms, long long refresh_ms, Py_ssize_t max_known,
               bint* expire) except -1:
    """AggregateUpkeep's schedule for one set (see its docstring): the keep to check now
    (0: not now), and in `expire` whether to refresh its TTL now, both recorded as done."""
    cdef long check, threshold = keep >> 2
    if threshold == 0:
        threshold = 1
    pending = since.get(key)
    if pending is None and len(since) >= max_known:
        since.clear()  # past this many sets, start over
        expired_at.clear()
    if pending is None or <long>pending + increments >= threshold:
        since[key] = 0
        check = keep
    else:
        since[key] = <long>pending + increments
        check = 0
    last = expired_at.get(key)
    if last is None or now_ms - <long long>last >= refresh_ms:
        expired_at[key] = now_ms
        expire[0] = True
    else:
        expire[0] = False
    return check


def upkeep_due(dict since, dict expired_at, str key, long keep, long increments,
               long long now_ms, long long refresh_ms, Py_ssize_t max_known):
    """(keep to check now, or 0; whether to refresh the TTL now): AggregateUpkeep.due."""
    cdef bint expire
    check = _due(since, expired_at, key, keep, increments, now_ms, refresh_ms, max_known,
                 &expire)
    return check, bool(expire)


def aggregate_args(list keys, list args, dict increments, str prefix, settled,
                   dict since, dict expired_at, long long now_ms, long long refresh_ms,
                   Py_ssize_t max_known, long covisit_keep, str covisit_half_life,
                   long trending_keep, str trending_half_life, double unit):
    """Appends each set of `increments` (suffix -> member -> increment) to an aggregate
    write: its key to `keys`, and to `args` its four arguments of state.APPLY_AGGREGATES
    (the keep to check, "1" to refresh its TTL, its half-life or "" when it is in
    `settled`, the joined increments), scheduled as AggregateUpkeep.due schedules them.
    The per-set loop of BatchProcessor._queue_aggregate, ~5% of the worker's CPU in
    Python (loadtest/README.md, session 24)."""
    cdef bint expire
    cdef long keep
    for suffix, members in increments.items():
        key = prefix + suffix
        keys.append(key)
        if (<str>suffix).startswith("cv:"):
            keep, half_life = covisit_keep, covisit_half_life
        else:
            keep, half_life = trending_keep, trending_half_life
        check = _due(since, expired_at, key, keep, len(members), now_ms, refresh_ms,
                     max_known, &expire)
        args.append(check)
        args.append("1" if expire else "0")
        args.append("" if suffix in settled else half_life)
        args.append(_join_increments(members, unit))
