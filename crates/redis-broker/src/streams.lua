#!lua name=wsgate
-- wsgate streams: numbered, kept and relayed publications (docs/redis.md, "Streams").
-- Installed by every gateway with FUNCTION LOAD REPLACE. Single and cluster mode load
-- the same source; only SHARDED differs (SPUBLISH instead of PUBLISH).
--
-- Every function takes the topic's pub/sub channel as its one key. The stream's keys
-- live in the channel's hash slot: `<channel>:<suffix>` when the channel has a
-- `{hash tag}`, else `{<channel>}:<suffix>`.
--   :stream   hash  epoch, seq              the numbering
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

local function keys_of(channel)
  local base = '{' .. channel .. '}'
  local open = string.find(channel, '{', 1, true)
  if open then
    local close = string.find(channel, '}', open + 1, true)
    if close and close > open + 1 then
      base = channel
    end
  end
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

local function now()
  local t = redis.call('TIME')
  local sec, usec = tonumber(t[1]), tonumber(t[2])
  return sec, usec, sec * 1000 + math.floor(usec / 1000)
end

-- The stream's epoch and seq; a stream whose keys are gone starts again at seq 0 in a
-- new epoch (hex seconds and microseconds of Redis's clock: letters and digits).
local function position(k, sec, usec, ttl_ms)
  local cur = redis.call('HMGET', k.stream, 'epoch', 'seq')
  if cur[1] then
    return cur[1], tonumber(cur[2]) or 0, false
  end
  local epoch = string.format('%x%05x', sec, usec)
  redis.call('DEL', k.history)
  redis.call('HSET', k.stream, 'epoch', epoch, 'seq', 0)
  redis.call('PEXPIRE', k.stream, ttl_ms)
  return epoch, 0, true
end

local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)-'))
end

-- Keeps at most `size` entries, none written before `cutoff` (ms).
local function trim(k, size, cutoff)
  if size then
    redis.call('XTRIM', k.history, 'MAXLEN', size)
  end
  -- Usually the oldest entry is young enough: one look.
  local head = redis.call('XRANGE', k.history, '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][2]) >= cutoff then
    return
  end
  while true do
    local batch = redis.call('XRANGE', k.history, '-', '+', 'COUNT', 64)
    if #batch == 0 then
      return
    end
    for _, e in ipairs(batch) do
      if tonumber(e[2][2]) >= cutoff then
        redis.call('XTRIM', k.history, 'MINID', e[1])
        return
      end
    end
    local last = seq_of(batch[#batch][1])
    redis.call('XTRIM', k.history, 'MINID', string.format('%d-0', last + 1))
  end
end

local function store_options(k, size, ttl_ms)
  redis.call('HSET', k.options, 'size', size, 'ttl', ttl_ms)
  redis.call('PEXPIRE', k.options, math.max(OPTIONS_TTL_MS, 2 * ttl_ms))
end

-- Relays a numbered publication to the nodes: the envelope the gateways read
-- (MAGIC, origin, "<epoch> <seq> <accepted_at>\n", payload).
local function relay(channel, origin, epoch, seq, at, payload)
  local message = MAGIC .. origin .. epoch .. ' ' .. string.format('%d', seq) .. ' ' .. at .. '\n' .. payload
  if SHARDED then
    redis.call('SPUBLISH', channel, message)
  else
    redis.call('PUBLISH', channel, message)
  end
end

-- Numbers, keeps and relays one publication. `at`: accepted_at (ns, as text) or nil
-- (a backend's: Redis's time). Returns { seq, epoch }.
local function append(channel, k, payload, at, origin, size, ttl_ms, options)
  local sec, usec, now_ms = now()
  local epoch, _, created = position(k, sec, usec, ttl_ms)
  local seq = redis.call('HINCRBY', k.stream, 'seq', 1)
  if options and (created or seq % OPTIONS_EVERY == 0) then
    -- Often enough for backends to find them, not on every publication.
    store_options(k, size, ttl_ms)
  end
  if at == nil then
    at = string.format('%d%06d000', sec, usec)
  end
  -- XADD's MAXLEN keeps the count; the age is trimmed every AGE_TRIM_EVERY
  -- publications (and on every read, which is all that returns entries).
  redis.call('XADD', k.history, 'MAXLEN', size, string.format('%d-0', seq),
    't', string.format('%d', now_ms), 'a', at, 'd', payload)
  if seq % AGE_TRIM_EVERY == 0 then
    trim(k, nil, now_ms - ttl_ms)
  end
  redis.call('PEXPIRE', k.stream, ttl_ms)
  redis.call('PEXPIRE', k.history, ttl_ms)
  relay(channel, origin, epoch, seq, at, payload)
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
  local k = keys_of(channel)
  local stored = redis.call('HMGET', k.options, 'size', 'ttl')
  local size = args[2] and int(args[2], 'history_size') or tonumber(stored[1]) or DEFAULT_SIZE
  local ttl_ms = args[3] and int(args[3], 'history_ttl_ms') or tonumber(stored[2]) or DEFAULT_TTL_MS
  if size < 1 then size = 1 end
  if ttl_ms < 1 then ttl_ms = 1 end
  if stored[1] then
    redis.call('PEXPIRE', k.options, math.max(OPTIONS_TTL_MS, 2 * ttl_ms))
  end
  return append(channel, k, payload, nil, 'b', size, ttl_ms, false)
end

-- FCALL wsgate_gateway_publish 1 <channel> <json> <accepted_at_ns> <history_size> <history_ttl_ms>
local function wsgate_gateway_publish(keys, args)
  local channel = keys[1]
  local k = keys_of(channel)
  local size, ttl_ms = int(args[3], 'history_size'), int(args[4], 'history_ttl_ms')
  int(args[2], 'accepted_at')
  return append(channel, k, args[1], args[2], 'g', size, ttl_ms, true)
end

-- FCALL wsgate_gateway_publish_many <nkeys> <channel>… then <history_size> <history_ttl_ms>
--   for each channel (in KEYS order), then <channel index> <json> <accepted_at_ns> for
--   each publication (index 1-based into KEYS)
-- What a gateway sends for several publications queued together (its pipeline under
-- load): each numbered, kept and relayed exactly as wsgate_gateway_publish would, in
-- their order, with one clock read, one position read and one seq write and expiry per
-- stream. Returns { {seq, epoch}, … }, one per publication, in order. Everything is
-- checked before anything is written.
local function wsgate_gateway_publish_many(keys, args)
  local usage = 'wsgate: usage: FCALL wsgate_gateway_publish_many <nkeys> <channel>... '
    .. '(<history_size> <history_ttl_ms>)... (<channel index> <json> <accepted_at_ns>)...'
  local first = 2 * #keys + 1
  if #keys == 0 or #args < first or (#args - first + 1) % 3 ~= 0 then
    error(usage)
  end
  local streams = {}
  for i, channel in ipairs(keys) do
    streams[i] = {
      channel = channel,
      k = keys_of(channel),
      size = math.max(int(args[2 * i - 1], 'history_size'), 1),
      ttl_ms = math.max(int(args[2 * i], 'history_ttl_ms'), 1),
    }
  end
  for j = first, #args, 3 do
    if streams[int(args[j], 'channel index')] == nil then
      error('wsgate: a channel index is not one of the keys')
    end
    int(args[j + 2], 'accepted_at')
  end
  local sec, usec, now_ms = now()
  local stamp = string.format('%d', now_ms)
  local out = {}
  for j = first, #args, 3 do
    local s = streams[tonumber(args[j])]
    local at, payload = args[j + 2], args[j + 1]
    if s.seq == nil then
      s.epoch, s.seq, s.options = position(s.k, sec, usec, s.ttl_ms)
    end
    s.seq = s.seq + 1
    if s.seq % OPTIONS_EVERY == 0 then
      s.options = true
    end
    if s.seq % AGE_TRIM_EVERY == 0 then
      s.trim = true
    end
    redis.call('XADD', s.k.history, 'MAXLEN', s.size, string.format('%d-0', s.seq),
      't', stamp, 'a', at, 'd', payload)
    relay(s.channel, 'g', s.epoch, s.seq, at, payload)
    out[#out + 1] = { s.seq, s.epoch }
  end
  for _, s in ipairs(streams) do
    if s.seq ~= nil then
      redis.call('HSET', s.k.stream, 'seq', s.seq)
      if s.options then
        store_options(s.k, s.size, s.ttl_ms)
      end
      if s.trim then
        trim(s.k, nil, now_ms - s.ttl_ms)
      end
      redis.call('PEXPIRE', s.k.stream, s.ttl_ms)
      redis.call('PEXPIRE', s.k.history, s.ttl_ms)
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
  store_options(k, size, ttl_ms)
  local sec, usec, now_ms = now()
  local epoch, seq = position(k, sec, usec, ttl_ms)
  trim(k, size, now_ms - ttl_ms)
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
