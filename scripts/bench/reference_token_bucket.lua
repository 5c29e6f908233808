-- A reference for scripts/bench.sh: the textbook token bucket over two string keys, the
-- layout of the widely deployed Spring Cloud Gateway limiter (GET, GET, SETEX, SETEX on
-- every call; the caller passes the time). Measured beside the project's script in the
-- same run, it turns the issue's anchor (6.0 µs per call for such a script on another
-- machine) into a figure for this one.
--
-- KEYS[1]  prefix of the two keys;  ARGV: capacity (tokens), rate (tokens/s), now (s)
local tokens_key = KEYS[1] .. ':tokens'
local timestamp_key = KEYS[1] .. ':ts'
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local ttl = math.floor(capacity / rate * 2)

local last_tokens = tonumber(redis.call('GET', tokens_key)) or capacity
local last_refreshed = tonumber(redis.call('GET', timestamp_key)) or 0
local filled = math.min(capacity, last_tokens + math.max(0, now - last_refreshed) * rate)
local allowed = 0
if filled >= 1 then
    filled = filled - 1
    allowed = 1
end
redis.call('SETEX', tokens_key, ttl, filled)
redis.call('SETEX', timestamp_key, ttl, now)
return {allowed, filled}
