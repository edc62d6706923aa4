"""Redis layout of Kairos state, and the fenced scripts that write it.

All keys of one session share the hash tag `{session id}`, all keys of one user the tag
`{u:user id}`, and the global aggregates the tag `{agg}`, so the layout works on Redis
Cluster. A session id may itself be "u:<id>": a user's key suffixes and a session's never
meet (tests/stream_engine/test_keys.py). Every key has a TTL but {ops}:migrations: a
migration that ran again after its record expired could undo what happened since (copy
an old block back over a consent given again). Vectors are raw little-endian float32.

    P:{sid}:s      hash   v (vector as of t), t, n (events), o/p (fence: last offset and
                          partition applied; p also tags the topic's incarnation,
                          planning.is_new), o2/p2 (the fence of the partition its
                          events came from before, once they moved: partitions added,
                          or the topic created again), u (user), r (recent items),
                          c (cart), b (bought), lt (last event time), w (written at, ms),
                          e (8-byte digests of its last 16 event ids: an event sent
                          again under its id at another offset is a duplicate)
    P:{sid}:imp    hash   impression counts per item or banner (frequency caps)
    P:{sid}:x      string "consent" (personalization off) or "erased"; checked on apply
    P:{u:uid}:u    hash   per linked session: s:<sid> (its vector), t:<sid>, n:<sid>; w;
                          a (anchor: the first session linked, which fixes the user's
                          holdout group). The profile is the sum of the session vectors,
                          decayed with the user half-life (vectors.user_profile).
    P:{u:uid}:ss   set    the user's linked sessions
    P:{u:uid}:ux   string "consent" or "erased" (":x" before session 31, which the
                          session "u:uid" shared: migrations.py carried them over)
    P:{agg}:fence  hash   partition -> last offset applied to the aggregates, and
                          <partition>:t -> the topic's incarnation it was taken on
    P:{agg}:meta   hash   L (landmark ms of forward decay)
    P:{agg}:lk     hash   aggregate key -> the landmark its scores are relative to
                          (and * -> the landmark of sets without one: UNMARKED)
    P:{agg}:cv:<item>     zset  next items, forward-decayed co-visitation scores
    P:{agg}:tr[:<node>]   zset  items, forward-decayed trending scores (global, per category)
    P:{ops}:migrations    hash  one-time moves of stored state done (migrations.py)
    P:{ops}:pressure      string  a counter the decision APIs increment when their reads are
                          slow; workers catching up slow down (stream_engine/pressure.py)

Every write checks its fence atomically with the write (compare-and-set): a redelivered or
replayed event changes nothing, and a write based on a stale read is refused and retried.

Aggregate scores grow as 2^((t - L)/h) from the landmark L in {agg}:meta, in integer units
of 1/AGG_UNIT of an event's weight. Integers because Redis keeps small sorted sets as
listpacks, where an integer score is stored as an integer and a fractional one as text that
every insert parses again: ZINCRBY on a 50-member set ran 3x faster with integer scores, and
a worker at 10,000 events/s left Redis a fifth of its CPU (loadtest/JOURNAL.md, session 22).
Integers stay exact below 2^52, so a worker moves L forward every REBASE_AFTER_HALF_LIVES of
the shorter half-life (MOVE_LANDMARK, one HSET). Each sorted set records its own landmark
in {agg}:lk and is scaled to the new one by the next write that touches it
(APPLY_AGGREGATES), so no script ever walks every key. Readers need no landmark: the API
divides each set by its best score; the latent model reads {agg}:lk to put rows written
before the last move on the same footing (latent.read_covisitation).
"""

from __future__ import annotations

from dataclasses import dataclass


def stored_int(raw: bytes | str | None) -> int | None:
    """A number the worker wrote into a session or user hash; None when absent, or when
    something else wrote the field: the worker and the API take the state without it (a
    count from zero, no fence, no write time) rather than fail on it. Only ASCII digits,
    with an optional minus, are a number: what the worker's scripts take as one (NUMBER
    below), so that a fence both sides read alike can be compared and set."""
    if raw is None:
        return None
    digits = raw[1:] if raw[:1] in (b"-", "-") else raw
    return int(raw) if digits.isascii() and digits.isdigit() else None


def stored_text(raw: bytes) -> str:
    """Text the worker wrote (ids, blocks); bytes that are not UTF-8 become an id no
    catalog has, rather than an error."""
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def session(self, sid: str) -> str:
        return f"{self.prefix}:{{{sid}}}:s"

    def impressions(self, sid: str) -> str:
        return f"{self.prefix}:{{{sid}}}:imp"

    def exposures(self, sid: str) -> str:
        """Decisions shown to the session, for attribution (stream_engine/attribution.py)."""
        return f"{self.prefix}:{{{sid}}}:exp"

    def session_block(self, sid: str) -> str:
        return f"{self.prefix}:{{{sid}}}:x"

    def user(self, uid: str) -> str:
        return f"{self.prefix}:{{u:{uid}}}:u"

    def user_sessions(self, uid: str) -> str:
        return f"{self.prefix}:{{u:{uid}}}:ss"

    def user_block(self, uid: str) -> str:
        # Not ":x" (before session 31): a session id may be "u:<uid>" (events.ID_PATTERN
        # takes ':'), and the session's block is {<sid>}:x, so that session's consent
        # events set and lifted the user's block. A user's suffixes (u, ss, ux) and a
        # session's (s, imp, exp, x) never meet. Blocks stored under the old key are
        # carried over once (stream_engine/migrations.py).
        return f"{self.prefix}:{{u:{uid}}}:ux"

    @property
    def agg_fence(self) -> str:
        return f"{self.prefix}:{{agg}}:fence"

    @property
    def agg_meta(self) -> str:
        return f"{self.prefix}:{{agg}}:meta"

    @property
    def agg_landmarks(self) -> str:
        """Each aggregate sorted set's landmark (its full key -> ms)."""
        return f"{self.prefix}:{{agg}}:lk"

    def covisit(self, item_id: str) -> str:
        return f"{self.prefix}:{{agg}}:cv:{item_id}"

    def trending(self, node: str | None = None) -> str:
        return f"{self.prefix}:{{agg}}:tr" + ("" if node is None else f":{node}")

    @property
    def migrations(self) -> str:
        """Which one-time moves of stored state have run (stream_engine/migrations.py)."""
        return f"{self.prefix}:{{ops}}:migrations"

    @property
    def pressure(self) -> str:
        """The API's slow-read reports, a counter the workers watch (stream_engine/pressure.py)."""
        return f"{self.prefix}:{{ops}}:pressure"


# The report's counters (stream_engine/attribution.py; read by api/report.py), all in the
# {report} hash slot, kept 8 days.
REPORT_TTL_MS = 8 * 86_400_000
# Freshness (Kafka record produced -> session state written) histogram, upper bounds in ms.
FRESHNESS_MS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                60000)  # fmt: skip
FRESHNESS_FIELDS = (*(f"fr|{b:g}" for b in FRESHNESS_MS), "fr|inf")


def minute_key(prefix: str, ts_ms: int) -> str:
    """Counters of the minute that holds ts_ms."""
    return f"{prefix}:{{report}}:m:{ts_ms // 60_000}"


def hll_key(prefix: str, kind: str, ts_ms: int) -> str:
    """A HyperLogLog of the hour that holds ts_ms."""
    return f"{prefix}:{{report}}:{kind}:{ts_ms // 3_600_000}"


def report_fence_key(prefix: str) -> str:
    return f"{prefix}:{{report}}:fence"


SESSION_FIELDS = ("v", "t", "n", "o", "p", "u", "r", "c", "b", "lt", "o2", "p2", "e")

# The Lua pattern of a stored number (stored_int above).
NUMBER = "'^%-?%d+$'"

# A fence in field F of a hash of fences (the aggregates', the report's) was taken on the
# topic's incarnation in field F:t (planning.incarnation_tag; none: written before tags,
# or while the topic's id could not be read). One of another incarnation is no fence:
# that topic numbered its offsets from 0 again. In a script where `cur` is F's value, `tag`
# this write's; read alike by fenced_on.
FENCED_ON = """
if tag ~= '0' and cur ~= '' then
  local was = redis.pcall('HGET', KEYS[1], ARGV[1] .. ':t')
  if type(was) == 'string' and was ~= tag then cur = '' end
end
"""


def fenced_on(fence: bytes | str | None, fence_tag: bytes | str | None, tag: int) -> int | None:
    """A fence read with its incarnation (FENCED_ON), as the fence for records of the
    topic's incarnation `tag`."""
    if tag and fence_tag is not None and stored_int(fence_tag) != tag:
        return None
    return stored_int(fence)


# KEYS: keys of one visitor; ARGV: the type each should have ("hash", "set", "string").
# Deletes each that holds another type (written by something else than the worker: its
# commands on it would fail on every event); returns how many went.
REPAIR_KEYS = """
local gone = 0
for i, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= ARGV[i] then
    redis.call('DEL', key)
    gone = gone + 1
  end
end
return gone
"""

# KEYS: session, impressions, block
# ARGV: expected fence ("" = none), new fence, partition, ttl ms, flags, n_fields,
#       field, value, ... , then impression item, count, ...
# flags: "U" unblock first (consent given again), "R" reset (delete the session's state
#        first), "B" block after (consent withdrawn: keep only the fence).
# Returns 1 applied, 0 fence conflict (re-read and retry), -1 erased, -2 blocked by consent.
# Written by something else: a stored fence that is not a number is no fence (expected
# ""); a session or block key of another type is a conflict (the worker's re-read repairs
# it: REPAIR_KEYS); an impressions key of another type goes, and a count that is not a
# number starts again from this write's.
APPLY_SESSION = """
local cur = redis.pcall('HGET', KEYS[1], 'o')
if type(cur) == 'table' then return 0 end
cur = cur or ''
if cur ~= ARGV[1] and (ARGV[1] ~= '' or string.match(cur, NUMBER)) then return 0 end
local block = redis.pcall('GET', KEYS[3])
if type(block) == 'table' then return 0 end
if block == 'erased' then return -1 end
local ttl = tonumber(ARGV[4])
local flags = ARGV[5]
if string.find(flags, 'U', 1, true) then
  redis.call('DEL', KEYS[3])
  block = false
end
if string.find(flags, 'R', 1, true) then redis.call('DEL', KEYS[1], KEYS[2]) end
if string.find(flags, 'B', 1, true) then
  redis.call('SET', KEYS[3], 'consent', 'PX', ttl)
  block = 'consent'
end
if block == 'consent' then
  redis.call('HSET', KEYS[1], 'o', ARGV[2], 'p', ARGV[3])
  redis.call('HDEL', KEYS[1], 'o2', 'p2')
  redis.call('PEXPIRE', KEYS[1], ttl)
  return -2
end
local nf = tonumber(ARGV[6])
local args = {'o', ARGV[2], 'p', ARGV[3]}
for i = 7, 6 + 2 * nf do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('PEXPIRE', KEYS[1], ttl)
local first_imp = 7 + 2 * nf
if #ARGV >= first_imp then
  for i = first_imp, #ARGV, 2 do
    local n = tonumber(ARGV[i + 1])
    local r = redis.pcall('HINCRBY', KEYS[2], ARGV[i], n)
    if type(r) == 'table' then
      if string.find(r.err, 'WRONGTYPE', 1, true) then redis.call('DEL', KEYS[2]) end
      redis.call('HSET', KEYS[2], ARGV[i], n)
    end
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
""".replace("NUMBER", NUMBER)

# KEYS: user, user sessions, user block
# ARGV: session id, session event count, session vector bytes ("" = none yet), its time ms,
#       ttl ms, written-at ms, max sessions kept
# Each linked session owns its own fields (s:<sid>, t:<sid>, n:<sid>), so two workers
# applying two sessions of one user never overwrite each other, and a redelivered or stale
# write (lower event count) changes nothing. Past max sessions the oldest one is dropped.
# Returns 1 applied, 2 stale (ignored), -1 erased or consent withdrawn. A user or sessions
# key of another type (written by something else) starts again (found by pcall: no extra
# command on the normal path); a count or time that is not a number counts as none.
APPLY_USER = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local sid = ARGV[1]
local n = tonumber(ARGV[2])
local cur = redis.pcall('HGET', KEYS[1], 'n:' .. sid)
if type(cur) == 'table' then  -- another type, written by something else: starts again
  redis.call('DEL', KEYS[1])
  cur = false
end
cur = tonumber(cur or '') or -1
if n < cur then return 2 end
local ttl = tonumber(ARGV[5])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 's:' .. sid, ARGV[3], 't:' .. sid, ARGV[4], 'n:' .. sid, n,
             'w', ARGV[6])
else
  redis.call('HSET', KEYS[1], 'n:' .. sid, n, 'w', ARGV[6])
end
redis.call('HSETNX', KEYS[1], 'a', sid)
redis.call('PEXPIRE', KEYS[1], ttl)
if type(redis.pcall('SADD', KEYS[2], sid)) == 'table' then
  redis.call('DEL', KEYS[2])  -- another type, written by something else: starts again
  redis.call('SADD', KEYS[2], sid)
end
redis.call('PEXPIRE', KEYS[2], ttl)
if redis.call('SCARD', KEYS[2]) > tonumber(ARGV[7]) then
  local oldest, oldest_t = nil, nil
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local t = tonumber(redis.call('HGET', KEYS[1], 't:' .. m) or '') or 0
    if oldest_t == nil or t < oldest_t then oldest, oldest_t = m, t end
  end
  redis.call('HDEL', KEYS[1], 's:' .. oldest, 't:' .. oldest, 'n:' .. oldest)
  redis.call('SREM', KEYS[2], oldest)
end
return 1
"""

# Aggregate scores are integers in units of 1/AGG_UNIT of an event's weight (see above).
AGG_UNIT = 1000
# The field of {agg}:lk that holds the landmark of sets without a mark of their own, once the
# record was replaced (no aggregate key is named so).
UNMARKED = "*"

# KEYS: agg fence, agg meta, agg landmarks, then the zsets to touch
# ARGV: partition, expected fence, new fence, landmark used, ttl ms, the topic's
#       incarnation tag ("0" unknown: see FENCED_ON), then per zset: keep (max members;
#       0 = don't check the size this time),
#       expire ("1" = refresh its TTL), its half-life ms ("" = the worker knows the set is
#       on this landmark: don't check), "member increment member increment ..."
# (ids never contain spaces; one packed argument per zset keeps client-side packing cheap;
# which sets to trim and re-expire is the worker's AggregateUpkeep)
# A set whose recorded landmark is older than L is first scaled to L, rounded to integers;
# members that round to 0 go. A set with none recorded that exists was written before
# whole units (by a worker of an earlier version, on the current landmark): it is scaled
# to units.
# Returns 1 applied, 0 fence or landmark conflict. A set of another type (written by
# something else) starts again; {agg}:lk of another type is replaced by a record whose
# UNMARKED field holds the current landmark, so that every set is on it until the landmark
# moves and is scaled from it after (a set with no mark and no UNMARKED field was written
# before whole units); a mark in it that is not a number is read as the set on the current
# landmark (and overwritten), and
# a partition's fence or the landmark that is not a number as none (the worker reads them
# as none too; the fence and meta hashes of another type the worker's read repairs:
# REPAIR_KEYS).
APPLY_AGGREGATES = (
    """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local tag = ARGV[6]
FENCED_ON
if cur ~= ARGV[2] and (ARGV[2] ~= '' or string.match(cur, NUMBER)) then return 0 end
local landmark = redis.call('HGET', KEYS[2], 'L')
if not landmark or not string.match(landmark, NUMBER) then  -- none, or not the worker's
  redis.call('HSET', KEYS[2], 'L', ARGV[4])
elseif landmark ~= ARGV[4] then
  return 0
end
local L = ARGV[4]
local ttl = tonumber(ARGV[5])
local i = 7
for k = 4, #KEYS do
  local key = KEYS[k]
  local expire = ARGV[i + 1] == '1'
  local at = L
  if ARGV[i + 2] ~= '' then
    at = redis.pcall('HGET', KEYS[3], key)
    if type(at) == 'table' then  -- {agg}:lk of another type: replaced, every set on L
      redis.call('DEL', KEYS[3])
      redis.call('HSET', KEYS[3], UNMARKED, L)
      at = L
    end
  end
  if at ~= L then
    local f = nil
    local hl = tonumber(ARGV[i + 2])
    if at then  -- a mark that is no number: as on L (and overwritten below)
      local mark = string.match(at, NUMBER) and tonumber(at)
      if mark then f = 2 ^ ((mark - tonumber(L)) / hl) end
    elseif redis.call('EXISTS', key) == 1 then
      local base = redis.call('HGET', KEYS[3], UNMARKED)
      if base and string.match(base, NUMBER) then  -- unmarked since the record's repair
        f = 2 ^ ((tonumber(base) - tonumber(L)) / hl)
        if f == 1 then f = nil end
      else
        f = AGG_UNIT  -- written before whole units: scores in event weights, on this landmark
      end
    end
    if f then
      expire = true  -- scaled to nothing, the set is gone with its TTL
      local rows = redis.pcall('ZRANGE', key, 0, -1, 'WITHSCORES')
      if rows.err then  -- another type, written by something else: starts again
        redis.call('DEL', key)
        rows = {}
      end
      for j = 1, #rows, 2000 do
        local args = {}
        for m = j, math.min(j + 1999, #rows), 2 do
          args[#args + 1] = math.floor(tonumber(rows[m + 1]) * f + 0.5)
          args[#args + 1] = rows[m]
        end
        redis.call('ZADD', key, unpack(args))
      end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', 0)
    end
    redis.pcall('HSET', KEYS[3], key, L)
  end
  local keep = tonumber(ARGV[i])
  local checked = false
  for member, inc in string.gmatch(ARGV[i + 3], '(%S+) (%S+)') do
    if checked then
      redis.call('ZINCRBY', key, inc, member)
    else  -- the first increment tells whether the key holds a sorted set
      checked = true
      if type(redis.pcall('ZINCRBY', key, inc, member)) == 'table' then
        redis.call('DEL', key)  -- another type, written by something else: starts again
        redis.call('ZINCRBY', key, inc, member)
        expire = true
      end
    end
  end
  if keep > 0 and redis.call('ZCARD', key) > keep then
    redis.call('ZREMRANGEBYRANK', key, 0, -keep - 1)
  end
  if expire then redis.call('PEXPIRE', key, ttl) end
  i = i + 4
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if tag ~= '0' then redis.call('HSET', KEYS[1], ARGV[1] .. ':t', tag) end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
return 1
""".replace("AGG_UNIT", str(AGG_UNIT))
    .replace("FENCED_ON", FENCED_ON)
    .replace("UNMARKED", f"'{UNMARKED}'")
    .replace("NUMBER", NUMBER)
)

# KEYS: a counter; ARGV: ttl ms. INCR, then PEXPIRE; returns the count. A key that
# something else overwrote (another type, or not a number) starts again from 1. (The
# learned model's sequence; the APIs' pressure counter.)
COUNT_UP = """
local v = redis.pcall('INCR', KEYS[1])
if type(v) == 'table' then
  redis.call('DEL', KEYS[1])
  v = redis.call('INCR', KEYS[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return v
"""

# KEYS: agg meta; ARGV: landmark expected, new landmark. Moves the landmark (compare-and-
# set); every sorted set follows at its next write (APPLY_AGGREGATES). Returns 1, or 0 if
# the landmark moved already.
MOVE_LANDMARK = """
if redis.call('HGET', KEYS[1], 'L') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'L', ARGV[2])
return 1
"""

# KEYS: user, user sessions, user block; ARGV: "consent" or "erased", ttl ms.
# Consent withdrawn by a linked session, or erasure: the profile goes, the block stays.
BLOCK_USER = """
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[3], ARGV[1], 'PX', tonumber(ARGV[2]))
if redis.call('TYPE', KEYS[2]).ok ~= 'set' then
  redis.call('DEL', KEYS[2])  -- none, or written by something else: no sessions known
  return {}
end
return redis.call('SMEMBERS', KEYS[2])
"""

# KEYS: user block. Consent given again: lift a consent block (never an erasure).
UNBLOCK_USER = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return 1 end
if redis.call('GET', KEYS[1]) == 'consent' then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: session, impressions, block; ARGV: ttl ms. Erasure of one session.
ERASE_SESSION = """
local o, p = false, false
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  o = redis.call('HGET', KEYS[1], 'o')
  p = redis.call('HGET', KEYS[1], 'p')
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], 'erased', 'PX', tonumber(ARGV[1]))
if o then
  redis.call('HSET', KEYS[1], 'o', o, 'p', p or '')
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
end
return 1
"""
