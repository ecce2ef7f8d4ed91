#!lua name=wsgate
-- wsgate streams: numbered, kept and relayed publications (docs/redis.md, "Streams").
-- Installed by every gateway with FUNCTION LOAD REPLACE. Single and cluster mode load
-- the same source; only SHARDED differs (SPUBLISH instead of PUBLISH).
--
-- Every function takes the topic's pub/sub channel as its one key. The stream's keys
-- live in the channel's hash slot: `<channel>:<suffix>` when the channel has a
-- `{hash tag}`, else `{<channel>}:<suffix>`.
--   :stream   hash  epoch, seq, hx          the numbering; until when :history is kept (ms)
--   :history  Redis stream, ids <seq>-0     fields t (ms, Redis time), a (accepted_at ns), d (payload)
--   :options  hash  size, ttl (ms)          written by gateways, read by backend publishes

local SHARDED = __SHARDED__
local DEFAULT_SIZE = __DEFAULT_SIZE__
local DEFAULT_TTL_MS = __DEFAULT_TTL_MS__
-- The options outlive the stream itself: a backend publishing into an idle stream still
-- finds them.
local OPTIONS_TTL_MS = 86400000
local MAGIC = '\255WSS1'
-- The publishing path writes the options and trims by age only every so often.
local OPTIONS_EVERY = 256
local AGE_TRIM_EVERY = 16
-- The history key is kept ttl + ttl/HISTORY_SLACK after it was last renewed.
local HISTORY_SLACK = 16

local function base_of(channel)
  local open = string.find(channel, '{', 1, true)
  if open then
    local close = string.find(channel, '}', open + 1, true)
    if close and close > open + 1 then
      return channel
    end
  end
  return '{' .. channel .. '}'
end

local function keys_of(channel)
  local base = base_of(channel)
  return {
    stream = base .. ':stream',
    history = base .. ':history',
    options = base .. ':options',
  }
end

local function int(s, what)
  local n = tonumber(s)
  if n == nil or n < 0 or n ~= math.floor(n) then
    error('wsgate: ' .. what .. ' must be a non-negative integer')
  end
  return n
end

-- An integer argument checked, and its canonical decimal text: what is passed on to
-- Redis (a Lua number would be formatted as a float on every call, which costs).
-- Returns nil for the number when the text has more digits than a Lua number holds
-- exactly (an accepted_at in ns: passed on as text only).
local function int_text(s, what)
  if type(s) == 'string' and #s <= 19 and (s == '0' or string.find(s, '^[1-9]%d*$')) then
    if #s <= 15 then
      return tonumber(s), s
    end
    return nil, s
  end
  local n = int(s, what)
  if n >= 1e15 then
    error('wsgate: ' .. what .. ' is too large')
  end
  return n, string.format('%d', n)
end

-- Redis's clock: seconds and microseconds (as text) and milliseconds.
local function now()
  local t = redis.call('TIME')
  return t[1], t[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function new_epoch(sec, usec)
  return string.format('%x%05x', tonumber(sec), tonumber(usec))
end

-- The stream's epoch and seq; a stream whose keys are gone starts again at seq 0 in a
-- new epoch (hex seconds and microseconds of Redis's clock: letters and digits).
local function position(k, sec, usec, ttl_ms)
  local cur = redis.call('HMGET', k.stream, 'epoch', 'seq')
  if cur[1] then
    return cur[1], tonumber(cur[2]) or 0, false
  end
  local epoch = new_epoch(sec, usec)
  redis.call('DEL', k.history)
  redis.call('HSET', k.stream, 'epoch', epoch, 'seq', 0)
  redis.call('PEXPIRE', k.stream, ttl_ms)
  return epoch, 0, true
end

local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)-'))
end

-- Keeps at most `size` entries, none written before `cutoff` (ms).
local function trim(history, size, cutoff)
  if size then
    redis.call('XTRIM', history, 'MAXLEN', size)
  end
  -- Usually the oldest entry is young enough: one look.
  local head = redis.call('XRANGE', history, '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][2]) >= cutoff then
    return
  end
  while true do
    local batch = redis.call('XRANGE', history, '-', '+', 'COUNT', 64)
    if #batch == 0 then
      return
    end
    for _, e in ipairs(batch) do
      if tonumber(e[2][2]) >= cutoff then
        redis.call('XTRIM', history, 'MINID', e[1])
        return
      end
    end
    local last = seq_of(batch[#batch][1])
    redis.call('XTRIM', history, 'MINID', string.format('%d-0', last + 1))
  end
end

local function store_options(options, size, ttl_ms)
  redis.call('HSET', options, 'size', size, 'ttl', ttl_ms)
  redis.call('PEXPIRE', options, math.max(OPTIONS_TTL_MS, 2 * ttl_ms))
end

-- A stream's options as a call names them, checked: the size and ttl as text (what
-- Redis gets), at least 1 each, and the ttl as a number.
local function options_of(size, ttl)
  local n_size, t_size = int_text(size, 'history_size')
  local n_ttl, t_ttl = int_text(ttl, 'history_ttl_ms')
  if n_size == nil or n_ttl == nil then
    error('wsgate: history_size and history_ttl_ms must be below 10^15')
  end
  if n_size < 1 then t_size = '1' end
  if n_ttl < 1 then n_ttl, t_ttl = 1, '1' end
  return t_size, n_ttl, t_ttl
end

-- The publishing path. Per publication: XADD to the history and PUBLISH of the relay
-- message. Per stream and call: one HMGET of where it stands, one HSET of its new seq,
-- one PEXPIRE of :stream. What every publication used to pay besides (a second
-- PEXPIRE, for :history, and the options) is paid now and then: the history key is
-- renewed to ttl + ttl/HISTORY_SLACK ahead once less than the ttl is left of it (its
-- deadline, hx, is kept in :stream), so it always outlives :stream, which expires
-- exactly ttl after the last publication with the numbering; nothing reads a history
-- past its stream (a new epoch deletes it first). Lean on purpose: in Redis every
-- `redis.call`, every table and every string made here costs.

-- Where a stream stands before its first publication of a call: epoch, seq, history
-- deadline, whether it was just created. A stream whose keys are gone starts again at
-- seq 0 in a new epoch; its old history goes.
local function open(stream, history, sec, usec)
  local cur = redis.call('HMGET', stream, 'epoch', 'seq', 'hx')
  if cur[1] then
    return cur[1], tonumber(cur[2]) or 0, tonumber(cur[3]) or 0, false
  end
  redis.call('DEL', history)
  return new_epoch(sec, usec), 0, 0, true
end

-- Keeps and relays publication `seq` (its text) of a stream. XADD's MAXLEN ~ keeps
-- the count to within one Redis stream node (reads trim it exactly: nothing past
-- history_size is ever returned); the age is trimmed every AGE_TRIM_EVERY
-- publications and on every read.
local function keep_and_relay(channel, history, size, epoch, seq, stamp, at, payload, origin)
  redis.call('XADD', history, 'MAXLEN', '~', size, seq .. '-0', 't', stamp, 'a', at, 'd', payload)
  local message = MAGIC .. origin .. epoch .. ' ' .. seq .. ' ' .. at .. '\n' .. payload
  if SHARDED then
    redis.call('SPUBLISH', channel, message)
  else
    redis.call('PUBLISH', channel, message)
  end
end

-- After a stream's publications of a call: its seq written, its keys' expiry.
local function close(stream, history, epoch, seq, last, hx, created, ttl_ms, ttl, now_ms)
  local renew = hx < now_ms + ttl_ms
  if renew then
    local keep = ttl_ms + math.floor(ttl_ms / HISTORY_SLACK)
    redis.call('PEXPIRE', history, string.format('%d', keep))
    hx = string.format('%d', now_ms + keep)
  end
  if created then
    redis.call('HSET', stream, 'epoch', epoch, 'seq', last, 'hx', hx)
  elseif renew then
    redis.call('HSET', stream, 'seq', last, 'hx', hx)
  else
    redis.call('HSET', stream, 'seq', last)
  end
  redis.call('PEXPIRE', stream, ttl)
end

-- One publication of a stream; `at` nil: a backend's (Redis's time). Returns { seq, epoch }.
local function publish_one(channel, payload, at, size, ttl_ms, ttl, origin, options)
  local base = base_of(channel)
  local stream, history = base .. ':stream', base .. ':history'
  local sec, usec, now_ms = now()
  local epoch, seq, hx, created = open(stream, history, sec, usec)
  seq = seq + 1
  local text = string.format('%d', seq)
  if at == nil then
    at = sec .. string.format('%06d', tonumber(usec)) .. '000'
  end
  keep_and_relay(channel, history, size, epoch, text, string.format('%d', now_ms), at, payload, origin)
  close(stream, history, epoch, seq, text, hx, created, ttl_ms, ttl, now_ms)
  if options and (created or seq % OPTIONS_EVERY == 0) then
    -- Often enough for backends to find them, not on every publication.
    store_options(base .. ':options', size, ttl)
  end
  if seq % AGE_TRIM_EVERY == 0 then
    trim(history, nil, now_ms - ttl_ms)
  end
  return { seq, epoch }
end

-- FCALL wsgate_publish 1 <channel> <payload> [history_size [history_ttl_ms]]
-- The one command backends use. Options: the arguments, else what the gateways stored
-- for the stream, else the defaults.
local function wsgate_publish(keys, args)
  local channel = keys[1]
  local payload = args[1]
  if channel == nil or payload == nil then
    error('wsgate: usage: FCALL wsgate_publish 1 <channel> <payload> [history_size [history_ttl_ms]]')
  end
  local options = base_of(channel) .. ':options'
  local stored = redis.call('HMGET', options, 'size', 'ttl')
  local size, ttl_ms, ttl = options_of(args[2] or stored[1] or DEFAULT_SIZE,
    args[3] or stored[2] or DEFAULT_TTL_MS)
  if stored[1] then
    redis.call('PEXPIRE', options, math.max(OPTIONS_TTL_MS, 2 * ttl_ms))
  end
  return publish_one(channel, payload, nil, size, ttl_ms, ttl, 'b', false)
end

-- FCALL wsgate_gateway_publish 1 <channel> <json> <accepted_at_ns> <history_size> <history_ttl_ms>
local function wsgate_gateway_publish(keys, args)
  local size, ttl_ms, ttl = options_of(args[3], args[4])
  local _, at = int_text(args[2], 'accepted_at')
  return publish_one(keys[1], args[1], at, size, ttl_ms, ttl, 'g', true)
end

-- FCALL wsgate_gateway_publish_many <nkeys> <channel>… then <history_size> <history_ttl_ms>
--   for each channel (in KEYS order), then <channel index> <json> <accepted_at_ns> for
--   each publication (index 1-based into KEYS)
-- What a gateway sends for several publications queued together (its pipeline under
-- load): each numbered, kept and relayed exactly as wsgate_gateway_publish would, in
-- their order, with one clock read, and one position read, seq write and expiry per
-- stream. Returns { {seq, epoch}, … }, one per publication, in order. Everything is
-- checked before anything is written.
local function wsgate_gateway_publish_many(keys, args)
  local usage = 'wsgate: usage: FCALL wsgate_gateway_publish_many <nkeys> <channel>... '
    .. '(<history_size> <history_ttl_ms>)... (<channel index> <json> <accepted_at_ns>)...'
  local first = 2 * #keys + 1
  if #keys == 0 or #args < first or (#args - first + 1) % 3 ~= 0 then
    error(usage)
  end
  local streams, named = {}, {}
  for i, channel in ipairs(keys) do
    local size, ttl_ms, ttl = options_of(args[2 * i - 1], args[2 * i])
    -- A channel named twice is one stream (with its first options).
    local s = named[channel]
    if s == nil then
      local base = base_of(channel)
      s = {
        channel = channel, base = base, stream = base .. ':stream', history = base .. ':history',
        size = size, ttl_ms = ttl_ms, ttl = ttl,
        epoch = false, seq = false, text = false, hx = 0, created = false,
        options = false, trim = false,
      }
      named[channel] = s
    end
    streams[i] = s
  end
  local ats = {}
  for j = first, #args, 3 do
    if streams[int(args[j], 'channel index')] == nil then
      error('wsgate: a channel index is not one of the keys')
    end
    local _, at = int_text(args[j + 2], 'accepted_at')
    ats[#ats + 1] = at
  end
  local sec, usec, now_ms = now()
  local stamp = string.format('%d', now_ms)
  local out = {}
  local touched = {}
  for j = first, #args, 3 do
    local s = streams[tonumber(args[j])]
    if not s.seq then
      s.epoch, s.seq, s.hx, s.created = open(s.stream, s.history, sec, usec)
      touched[#touched + 1] = s
    end
    s.seq = s.seq + 1
    s.text = string.format('%d', s.seq)
    if s.seq % OPTIONS_EVERY == 0 then
      s.options = true
    end
    if s.seq % AGE_TRIM_EVERY == 0 then
      s.trim = true
    end
    local n = #out + 1
    keep_and_relay(s.channel, s.history, s.size, s.epoch, s.text, stamp, ats[n], args[j + 1], 'g')
    out[n] = { s.seq, s.epoch }
  end
  for _, s in ipairs(touched) do
    close(s.stream, s.history, s.epoch, s.seq, s.text, s.hx, s.created, s.ttl_ms, s.ttl, now_ms)
    if s.options or s.created then
      store_options(s.base .. ':options', s.size, s.ttl)
    end
    if s.trim then
      trim(s.history, nil, now_ms - s.ttl_ms)
    end
  end
  return out
end

-- FCALL wsgate_history 1 <channel> <history_size> <history_ttl_ms> latest <limit>
-- FCALL wsgate_history 1 <channel> <history_size> <history_ttl_ms> after <seq> <limit>
-- FCALL wsgate_history 1 <channel> <history_size> <history_ttl_ms> restart <epoch> <seq>
-- Returns { epoch, seq, first, seq1, accepted_at1, payload1, seq2, … } oldest first;
-- `first` is the oldest seq kept (seq + 1 when none is).
local function wsgate_history(keys, args)
  local k = keys_of(keys[1])
  local size, ttl_ms = int(args[1], 'history_size'), int(args[2], 'history_ttl_ms')
  if args[3] == 'restart' then
    -- A node delivered up to seq <args[5]> of epoch <args[4]>, and the stream is behind
    -- it: a failover lost acknowledged publications, and their seqs would be handed
    -- out again. Start over in a new epoch (once: a restarted stream is only read).
    local cur = redis.call('HMGET', k.stream, 'epoch', 'seq')
    if cur[1] == args[4] and (tonumber(cur[2]) or 0) < int(args[5], 'seq') then
      redis.call('DEL', k.stream, k.history)
    end
  end
  store_options(k.options, size, ttl_ms)
  local sec, usec, now_ms = now()
  local epoch, seq = position(k, sec, usec, ttl_ms)
  trim(k.history, size, now_ms - ttl_ms)
  local first = seq + 1
  local head = redis.call('XRANGE', k.history, '-', '+', 'COUNT', 1)
  if #head > 0 then
    first = seq_of(head[1][1])
  end
  local out = { epoch, seq, first }
  local entries = {}
  if args[3] == 'latest' then
    local limit = int(args[4], 'limit')
    if limit > 0 then
      local newest = redis.call('XREVRANGE', k.history, '+', '-', 'COUNT', limit)
      for i = #newest, 1, -1 do
        entries[#entries + 1] = newest[i]
      end
    end
  elseif args[3] == 'after' then
    local after, limit = int(args[4], 'seq'), int(args[5], 'limit')
    if limit > 0 then
      entries = redis.call('XRANGE', k.history, string.format('%d-0', after + 1), '+', 'COUNT', limit)
    end
  elseif args[3] ~= 'restart' then
    error('wsgate: the query must be latest, after or restart')
  end
  for _, e in ipairs(entries) do
    out[#out + 1] = seq_of(e[1])
    out[#out + 1] = e[2][4]
    out[#out + 1] = e[2][6]
  end
  return out
end

redis.register_function('wsgate_publish', wsgate_publish)
redis.register_function('wsgate_gateway_publish', wsgate_gateway_publish)
redis.register_function('wsgate_gateway_publish_many', wsgate_gateway_publish_many)
redis.register_function('wsgate_history', wsgate_history)
