-- take_all() of arithmetic.rs, run atomically inside Redis: one request over all the
-- buckets it draws on, all or nothing.
--
-- KEYS[k]  one hash per policy and key, holding the buckets of that policy's limits:
--          per limit a tokens field (units) and a ts field (µs of its last write), and
--          one `exp` (µs at which the hash expires) for them all
-- ARGV[1]  now_us, or '' to read Redis's own clock (the same one for every instance);
--          only the parity tests pass a time
-- then per key: m, the number of its limits, and six per limit:
--          tokens field, ts field,
--          capacity_units       a full bucket (burst × one token's units)
--          refill_units_per_us  units gained per µs
--          cost_units           what this request costs here; 0 reads without writing
--          group                0: enforced (all pay or none); n > 0: shadow policy n
--
-- Returns {had_1, tokens_1, had_2, tokens_2, ...} per limit in order: whether it had the
-- cost (1/0), and its units after deciding. Every quantity stays below 2^53, where Lua's
-- doubles are exact integers (Limit::parse enforces it).

local now_us = tonumber(ARGV[1])
if not now_us then
    local time = redis.call('TIME')
    now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

-- One bucket (the default policy, every one-limit policy without shadow policies beside
-- it): the same steps as below, without the tables the general case needs. The parity
-- table runs both paths.
if #KEYS == 1 and ARGV[2] == '1' then
    local capacity = tonumber(ARGV[5])
    local refill_units_per_us = tonumber(ARGV[6])
    local cost = tonumber(ARGV[7])
    local state = redis.call('HMGET', KEYS[1], ARGV[3], ARGV[4], 'exp')
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
    if tokens < cost then
        return {0, tokens}
    end
    if cost == 0 then
        return {1, tokens}
    end
    tokens = tokens - cost
    local full_at_us = now_us + math.ceil((capacity - tokens) / refill_units_per_us)
    local expires_us = tonumber(state[3])
    local tokens_text, now_text = string.format('%d', tokens), string.format('%d', now_us)
    if expires_us and full_at_us <= expires_us then
        redis.call('HSET', KEYS[1], ARGV[3], tokens_text, ARGV[4], now_text)
        return {1, tokens}
    end
    if expires_us then
        expires_us = now_us + math.ceil(capacity / refill_units_per_us)
    else
        expires_us = full_at_us
    end
    redis.call('HSET', KEYS[1], ARGV[3], tokens_text, ARGV[4], now_text, 'exp', string.format('%d', expires_us))
    redis.call('PEXPIRE', KEYS[1], math.max(math.ceil((expires_us - now_us) / 1000), 1))
    return {1, tokens}
end

-- First, read every bucket: units now, and whether each has its cost.
local tokens_of, expires_of = {}, {}
local admitted = true
-- Only requests with shadow policies pay for this table.
local shadow_has = nil
local at, l = 2, 0
for k = 1, #KEYS do
    local m = tonumber(ARGV[at])
    at = at + 1
    local state
    if m == 1 then
        state = redis.call('HMGET', KEYS[k], ARGV[at], ARGV[at + 1], 'exp')
    else
        local fields = {}
        for j = 0, m - 1 do
            fields[2 * j + 1] = ARGV[at + 6 * j]
            fields[2 * j + 2] = ARGV[at + 6 * j + 1]
        end
        fields[2 * m + 1] = 'exp'
        state = redis.call('HMGET', KEYS[k], unpack(fields))
    end
    expires_of[k] = tonumber(state[2 * m + 1])
    for j = 1, m do
        l = l + 1
        local capacity = tonumber(ARGV[at + 2])
        local refill_units_per_us = tonumber(ARGV[at + 3])
        local group = ARGV[at + 5]
        -- refill(): a missing bucket is full; a clock that went backwards refills nothing.
        local tokens = tonumber(state[2 * j - 1])
        local updated_us = tonumber(state[2 * j])
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
        local has = tokens >= tonumber(ARGV[at + 4])
        tokens_of[l] = tokens
        if group == '0' then
            admitted = admitted and has
        else
            shadow_has = shadow_has or {}
            shadow_has[group] = (shadow_has[group] ~= false) and has
        end
        at = at + 6
    end
end

-- Then pay. A denial writes nothing, and neither does a bucket charged 0 tokens (a read),
-- since each stored state still describes its bucket.
local result = {}
local now_text = nil
at, l = 2, 0
for k = 1, #KEYS do
    local m = tonumber(ARGV[at])
    at = at + 1
    local writes = nil
    local expires_us = expires_of[k]
    local extend, full_at_us, refill_time_us = false, 0, 0
    for j = 1, m do
        l = l + 1
        local tokens = tokens_of[l]
        local cost = tonumber(ARGV[at + 4])
        result[2 * l - 1] = tokens >= cost and 1 or 0
        local group = ARGV[at + 5]
        if cost > 0 and admitted and (group == '0' or shadow_has[group]) then
            local capacity = tonumber(ARGV[at + 2])
            local refill_units_per_us = tonumber(ARGV[at + 3])
            tokens = tokens - cost
            now_text = now_text or string.format('%d', now_us)
            writes = writes or {}
            local n = #writes
            writes[n + 1], writes[n + 2] = ARGV[at], string.format('%d', tokens)
            writes[n + 3], writes[n + 4] = ARGV[at + 1], now_text
            -- The hash must live until every bucket in it would be full again: a missing
            -- bucket is a full one, so forgetting it then loses nothing, and forgetting it
            -- earlier would admit too much.
            local full_at = now_us + math.ceil((capacity - tokens) / refill_units_per_us)
            full_at_us = math.max(full_at_us, full_at)
            refill_time_us = math.max(refill_time_us, math.ceil(capacity / refill_units_per_us))
            extend = extend or not (expires_us and full_at <= expires_us)
        end
        result[2 * l] = tokens
        at = at + 6
    end
    if writes then
        if extend then
            -- A new hash expires exactly when its buckets are full. One that would expire
            -- too early is extended to a whole refill time from now, the longest any of its
            -- buckets needs, so a returning client's next decisions write only the fields:
            -- one write command, nothing extra to replicate.
            if expires_us then
                expires_us = now_us + refill_time_us
            else
                expires_us = full_at_us
            end
            local n = #writes
            writes[n + 1], writes[n + 2] = 'exp', string.format('%d', expires_us)
            redis.call('HSET', KEYS[k], unpack(writes))
            redis.call('PEXPIRE', KEYS[k], math.max(math.ceil((expires_us - now_us) / 1000), 1))
        else
            redis.call('HSET', KEYS[k], unpack(writes))
        end
    end
end
return result
