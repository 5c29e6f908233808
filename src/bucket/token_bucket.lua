-- take_all() of arithmetic.rs, run atomically inside Redis: one request over all the
-- buckets it draws on, all or nothing.
--
-- KEYS[i]  bucket i: a hash with fields `tokens` (units), `ts` (µs of the last write)
--          and `exp` (µs at which the key expires)
-- ARGV[1]  now_us, or '' to read Redis's own clock (the same one for every instance);
--          only the parity tests pass a time
-- then four per bucket, at ARGV[4i-2 .. 4i+1]:
--          capacity_units       a full bucket (burst × one token's units)
--          refill_units_per_us  units gained per µs
--          cost_units           what this request costs here
--          group                0: enforced (all pay or none); n > 0: shadow policy n
--
-- Returns {had_1, tokens_1, had_2, tokens_2, ...}: whether bucket i had the cost (1/0),
-- and its units after deciding. Every quantity stays below 2^53, where Lua's doubles
-- are exact integers (Limit::parse enforces it).

local now_us = tonumber(ARGV[1])
if not now_us then
    local time = redis.call('TIME')
    now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local n = #KEYS
local capacity, refill_units_per_us, cost, group = {}, {}, {}, {}
local held, expires, has = {}, {}, {}
local group_has = {}
for i = 1, n do
    local at = 4 * i - 2
    capacity[i] = tonumber(ARGV[at])
    refill_units_per_us[i] = tonumber(ARGV[at + 1])
    cost[i] = tonumber(ARGV[at + 2])
    group[i] = ARGV[at + 3]

    -- refill(): a missing bucket is full; a clock that went backwards refills nothing.
    local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts', 'exp')
    local tokens = tonumber(state[1])
    local updated_us = tonumber(state[2])
    if tokens == nil or updated_us == nil then
        tokens = capacity[i]
    else
        local elapsed = math.max(now_us - updated_us, 0)
        local missing = math.max(capacity[i] - tokens, 0)
        if elapsed * refill_units_per_us[i] >= missing then
            tokens = capacity[i]
        else
            tokens = tokens + elapsed * refill_units_per_us[i]
        end
    end
    held[i] = tokens
    expires[i] = tonumber(state[3])
    has[i] = tokens >= cost[i]
    if group_has[group[i]] == nil then
        group_has[group[i]] = true
    end
    group_has[group[i]] = group_has[group[i]] and has[i]
end

-- A denial writes nothing, since each stored state still describes its bucket.
local admitted = group_has['0'] ~= false
local result = {}
local now_text = string.format('%d', now_us)
for i = 1, n do
    local tokens = held[i]
    if admitted and group_has[group[i]] then
        tokens = tokens - cost[i]
        -- The key must live until the bucket would be full again: a missing bucket is a
        -- full one, so forgetting it then loses nothing, and forgetting it earlier would
        -- admit too much. A new key expires exactly then. A key that would expire too
        -- early is extended to a whole refill time from now, the longest any bucket
        -- needs, so a returning client's next decisions write only the hash: one write
        -- command, nothing extra to replicate.
        local full_at_us = now_us + math.ceil((capacity[i] - tokens) / refill_units_per_us[i])
        local expires_us = expires[i]
        local tokens_text = string.format('%d', tokens)
        if expires_us and full_at_us <= expires_us then
            redis.call('HSET', KEYS[i], 'tokens', tokens_text, 'ts', now_text)
        else
            if expires_us then
                expires_us = now_us + math.ceil(capacity[i] / refill_units_per_us[i])
            else
                expires_us = full_at_us
            end
            redis.call('HSET', KEYS[i], 'tokens', tokens_text, 'ts', now_text, 'exp', string.format('%d', expires_us))
            redis.call('PEXPIRE', KEYS[i], math.max(math.ceil((expires_us - now_us) / 1000), 1))
        end
    end
    result[2 * i - 1] = has[i] and 1 or 0
    result[2 * i] = tokens
end
return result
