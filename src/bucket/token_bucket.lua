-- take_all() of arithmetic.rs, run atomically inside Redis: one request over all the
-- buckets it draws on, all or nothing; or a batch of requests, each decided so in turn.
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
--          cost_units           what this request costs here; 0 reads the bucket and
--                               writes nothing
--          group                0: enforced (all pay or none); n > 0: shadow policy n
--
-- Returns {had_1, tokens_1, had_2, tokens_2, ...} per limit in order: whether it had the
-- cost (1/0), and its units after deciding. Every quantity stays below 2^53, where Lua's
-- doubles are exact integers (Limit::parse enforces it).
--
-- A batch (several requests that were waiting on one connection) says so in ARGV[2]:
-- ARGV[2]  'batch'
-- ARGV[3]  n, the number of requests
-- then per request: its number of keys, its number of arguments after these two, and
--          its arguments as above from m on. KEYS holds every request's keys in order
--          (one hash may appear in several requests).
-- The requests are decided one after another on one clock, each on the buckets as the
-- ones before it left them: take_all() applied request after request. Returns one answer
-- per request: its array as above, or an error for that request alone when one of its
-- keys holds something that is not a bucket (it decides nothing; the others are decided).

local now_us = tonumber(ARGV[1])
if not now_us then
    local time = redis.call('TIME')
    now_us = time[1] * 1000000 + time[2]
end

-- Numbers arrive as strings; `s + 0` converts one with a single strtod where tonumber
-- takes two, and a value in a bucket field that is not a number is an error, not a full
-- bucket.

-- refill(): a missing bucket is full; a clock that went backwards refills nothing. The
-- second answer says whether the bucket was written ahead of this clock (rebased() in
-- arithmetic.rs): such a bucket is written again now, even when it pays nothing, so that
-- it loses the skew once instead of refilling nothing until this clock catches up.
local function refilled(tokens, updated_us, capacity, refill_units_per_us)
    if not (tokens and updated_us) then
        return capacity, false
    end
    tokens = tokens + 0
    local gained = (now_us - updated_us) * refill_units_per_us
    if gained < 0 then
        return tokens, true
    end
    if gained >= capacity - tokens then
        return capacity, false
    end
    return tokens + gained, false
end

-- Stages the write of the bucket whose arguments start at ARGV[at], holding `tokens`
-- now, into `writes` (field, value pairs of one hash); returns the hash's new latest
-- full time and longest refill time.
local now_text = nil
local function stage(writes, at, tokens, full_at_us, refill_time_us)
    local capacity, refill_units_per_us = ARGV[at + 2] + 0, ARGV[at + 3] + 0
    now_text = now_text or string.format('%d', now_us)
    local n = #writes
    writes[n + 1], writes[n + 2] = ARGV[at], string.format('%d', tokens)
    writes[n + 3], writes[n + 4] = ARGV[at + 1], now_text
    return math.max(full_at_us, now_us + math.ceil((capacity - tokens) / refill_units_per_us)),
        math.max(refill_time_us, math.ceil(capacity / refill_units_per_us))
end

-- Writes a hash's staged buckets. The hash must live until every bucket in it would be
-- full again: a missing bucket is a full one, so forgetting it then loses nothing, and
-- forgetting it earlier would admit too much. A new hash expires exactly when its
-- buckets are full. One that would expire too early is extended to a whole refill time
-- from now, the longest any of its buckets needs, so a returning client's next decisions
-- write only the fields: one write command, nothing extra to replicate.
local function persist(key, writes, expires_us, full_at_us, refill_time_us)
    if expires_us and full_at_us <= expires_us then
        redis.call('HSET', key, unpack(writes))
        return
    end
    if expires_us then
        expires_us = now_us + refill_time_us
    else
        expires_us = full_at_us
    end
    local n = #writes
    writes[n + 1], writes[n + 2] = 'exp', string.format('%d', expires_us)
    redis.call('HSET', key, unpack(writes))
    redis.call('PEXPIRE', key, math.max(math.ceil((expires_us - now_us) / 1000), 1))
end

-- Reads one hash's buckets: HMGET of every limit's two fields, and `exp`.
local function read(key, at, m)
    if m == 1 then
        return redis.call('HMGET', key, ARGV[at], ARGV[at + 1], 'exp')
    end
    local fields = {}
    for j = 0, m - 1 do
        fields[2 * j + 1] = ARGV[at + 6 * j]
        fields[2 * j + 2] = ARGV[at + 6 * j + 1]
    end
    fields[2 * m + 1] = 'exp'
    return redis.call('HMGET', key, unpack(fields))
end

-- One hash, one policy: every request under a single policy, however many limits it has.
-- Its limits share a group, so they pay together or not at all, whatever the group is;
-- one pass decides and stages the payments, and a denial drops them and gives back what
-- the pass took before it found out. The general case below gives the same answers (the
-- parity table runs both). `first` is where the hash's arguments start (its m).
local function one_hash(key, first)
    local m = ARGV[first] + 0
    local state = read(key, first + 1, m)
    local expires_us = state[2 * m + 1]
    expires_us = expires_us and expires_us + 0
    local result, writes = {}, {}
    local admitted, ahead = true, nil
    local full_at_us, refill_time_us = 0, 0
    for j = 1, m do
        local at = first + 6 * j - 5
        local cost = ARGV[at + 4] + 0
        local tokens, rebased = refilled(state[2 * j - 1], state[2 * j], ARGV[at + 2] + 0, ARGV[at + 3] + 0)
        if rebased then
            ahead = ahead or {}
            ahead[#ahead + 1] = j
        end
        if tokens < cost then
            admitted = false
            result[2 * j - 1] = 0
        else
            result[2 * j - 1] = 1
            -- A bucket charged nothing is read, not written: its stored state still
            -- describes it, and the hash already lives until it is full.
            if cost > 0 then
                tokens = tokens - cost
                full_at_us, refill_time_us = stage(writes, at, tokens, full_at_us, refill_time_us)
            end
        end
        result[2 * j] = tokens
    end
    if not admitted then
        for j = 1, m do
            if result[2 * j - 1] == 1 then
                result[2 * j] = result[2 * j] + ARGV[first + 6 * j - 1]
            end
        end
        writes, full_at_us, refill_time_us = {}, 0, 0
    end
    if ahead and #writes == 0 then
        for _, j in ipairs(ahead) do
            full_at_us, refill_time_us = stage(writes, first + 6 * j - 5, result[2 * j], full_at_us, refill_time_us)
        end
    end
    if #writes > 0 then
        persist(key, writes, expires_us, full_at_us, refill_time_us)
    end
    return result
end

-- Several policies: the hashes KEYS[after_key + 1 .. after_key + keys], their arguments
-- from ARGV[first]. First, read every bucket: units now, and whether each has its cost.
local function several(after_key, keys, first)
    local tokens_of, expires_of = {}, {}
    local admitted = true
    -- Only requests with shadow policies, or with buckets from a clock ahead, pay for these.
    local shadow_has, ahead_of = nil, nil
    local at, l = first, 0
    for k = 1, keys do
        local m = ARGV[at] + 0
        at = at + 1
        local state = read(KEYS[after_key + k], at, m)
        local expires_us = state[2 * m + 1]
        expires_of[k] = expires_us and expires_us + 0
        for j = 1, m do
            l = l + 1
            local tokens, rebased = refilled(state[2 * j - 1], state[2 * j], ARGV[at + 2] + 0, ARGV[at + 3] + 0)
            if rebased then
                ahead_of = ahead_of or {}
                ahead_of[l] = true
            end
            local has = tokens >= ARGV[at + 4] + 0
            tokens_of[l] = tokens
            local group = ARGV[at + 5]
            if group == '0' then
                admitted = admitted and has
            else
                shadow_has = shadow_has or {}
                shadow_has[group] = (shadow_has[group] ~= false) and has
            end
            at = at + 6
        end
    end

    -- Then pay. A bucket that pays nothing keeps its stored state, which still describes it.
    local result = {}
    at, l = first, 0
    for k = 1, keys do
        local m = ARGV[at] + 0
        at = at + 1
        local writes = {}
        local full_at_us, refill_time_us = 0, 0
        for j = 1, m do
            l = l + 1
            local tokens = tokens_of[l]
            local cost = ARGV[at + 4] + 0
            result[2 * l - 1] = tokens >= cost and 1 or 0
            local group = ARGV[at + 5]
            local pays = admitted and cost > 0 and (group == '0' or shadow_has[group])
            if pays then
                tokens = tokens - cost
            end
            if pays or (ahead_of and ahead_of[l]) then
                full_at_us, refill_time_us = stage(writes, at, tokens, full_at_us, refill_time_us)
            end
            result[2 * l] = tokens
            at = at + 6
        end
        if #writes > 0 then
            persist(KEYS[after_key + k], writes, expires_of[k], full_at_us, refill_time_us)
        end
    end
    return result
end

-- One request: its `keys` hashes from KEYS[after_key + 1], its arguments from ARGV[first].
local function decide(after_key, keys, first)
    if keys == 1 then
        return one_hash(KEYS[after_key + 1], first)
    end
    return several(after_key, keys, first)
end

if ARGV[2] ~= 'batch' then
    return decide(0, #KEYS, 2)
end

-- A batch: each request on its own, in order, on the buckets as the ones before it left
-- them. A request that fails (WRONGTYPE, or a field that is not a number) fails in its
-- reads, before anything of it is written, so it leaves nothing behind; it is answered
-- with its error and the next request is decided.
local answers = {}
local after_key, at = 0, 4
for r = 1, ARGV[3] + 0 do
    local keys, length = ARGV[at] + 0, ARGV[at + 1] + 0
    local decided, answer = pcall(decide, after_key, keys, at + 2)
    if decided or type(answer) == 'table' then
        answers[r] = answer
    elseif string.find(answer, '^%u+ ') then
        -- A command's error keeps its code (WRONGTYPE ...).
        answers[r] = redis.error_reply(answer)
    else
        -- The script's own, as Redis would have answered it: ERR user_script:...
        answers[r] = redis.error_reply('ERR ' .. answer)
    end
    after_key, at = after_key + keys, at + 2 + length
end
return answers
