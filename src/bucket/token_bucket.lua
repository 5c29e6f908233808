-- The token bucket of bucket.rs, run atomically inside Redis.
--
-- KEYS[1]  the bucket: a hash with fields `tokens` (units), `ts` (µs of the last write)
--          and `exp` (µs at which the key expires)
-- ARGV[1]  capacity_units       a full bucket (burst × window_us)
-- ARGV[2]  refill_units_per_us  units gained per µs (the rate limit)
-- ARGV[3]  cost_units           one token (window_us)
-- ARGV[4]  now_us (optional)    only the parity tests pass it; otherwise Redis's own
--                               clock decides, the same one for every instance
--
-- Returns {allowed (1/0), tokens after deciding}. Every quantity stays below 2^53, where
-- Lua's doubles are exact integers (Policy::parse enforces it).

local capacity = tonumber(ARGV[1])
local refill_units_per_us = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local now_us = tonumber(ARGV[4])
if not now_us then
    local time = redis.call('TIME')
    now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

-- refill(): a missing bucket is full; a clock that went backwards refills nothing.
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'exp')
local tokens = tonumber(state[1])
local updated_us = tonumber(state[2])
if tokens == nil or updated_us == nil then
    tokens = capacity
else
    local elapsed = math.max(now_us - updated_us, 0)
    local missing = math.max(capacity - tokens, 0)
    if elapsed * refill_units_per_us >= missing then
        tokens = capacity
    else
        tokens = tokens + elapsed * refill_units_per_us
    end
end

-- take(): a denial writes nothing, since the stored state still describes the bucket.
if tokens < cost then
    return {0, tokens}
end
tokens = tokens - cost

-- The key must live until the bucket would be full again: a missing bucket is a full one,
-- so forgetting it then loses nothing, and forgetting it earlier would admit too much. A
-- new key expires exactly then. A key that would expire too early is extended to a whole
-- refill time from now, the longest any bucket needs, so a returning client's next
-- decisions write only the hash: one write command, nothing extra to replicate.
local full_at_us = now_us + math.ceil((capacity - tokens) / refill_units_per_us)
local expires_us = tonumber(state[3])
local tokens_text, now_text = string.format('%d', tokens), string.format('%d', now_us)
if expires_us and full_at_us <= expires_us then
    redis.call('HSET', KEYS[1], 'tokens', tokens_text, 'ts', now_text)
    return {1, tokens}
end
if expires_us then
    expires_us = now_us + math.ceil(capacity / refill_units_per_us)
else
    expires_us = full_at_us
end
redis.call('HSET', KEYS[1], 'tokens', tokens_text, 'ts', now_text, 'exp', string.format('%d', expires_us))
redis.call('PEXPIRE', KEYS[1], math.max(math.ceil((expires_us - now_us) / 1000), 1))
return {1, tokens}
