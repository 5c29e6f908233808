-- refund() of refund.rs, run atomically inside Redis: gives back what a request paid in
-- these buckets when a bucket in another hash slot refused it, or hits a caller gives back
-- (Envoy's is_negative_hits). refund.rs argues what each kind of refund keeps true.
--
-- KEYS[k]  the hashes token_bucket.lua wrote, in the same layout (a tokens field and a ts
--          field per limit); a refund never touches `exp` nor the key's expiry, since
--          a fuller bucket is full again sooner, never later
-- ARGV[1]  now_us, or '' to read Redis's own clock; only the parity tests pass a time
-- ARGV[2]  paid_at_us: a time on this master's clock no later than the payment
--          (Paid::NoEarlierThan), or '' when the payment's time is unknown (Paid::Unknown):
--          nothing decays, and any stored state may hold the payment
-- then per key: m, the number of its limits, and five per limit:
--          tokens field, ts field, capacity_units, refill_units_per_us, cost_units
--
-- Returns {units_1, units_2, ...}: what each bucket holds after the refund.

local now_us = tonumber(ARGV[1])
if not now_us then
    local time = redis.call('TIME')
    now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local paid_at_us = tonumber(ARGV[2])

local result = {}
local at, l = 3, 0
for k = 1, #KEYS do
    local m = tonumber(ARGV[at])
    at = at + 1
    for j = 1, m do
        l = l + 1
        local capacity = tonumber(ARGV[at + 2])
        local refill_units_per_us = tonumber(ARGV[at + 3])
        local cost = tonumber(ARGV[at + 4])
        local state = redis.call('HMGET', KEYS[k], ARGV[at], ARGV[at + 1])
        local tokens = tonumber(state[1])
        local updated_us = tonumber(state[2])
        if tokens == nil or updated_us == nil then
            -- Missing: a missing bucket is full, and the payment is not here.
            result[l] = capacity
        else
            -- refill(): a clock that went backwards refills nothing.
            local elapsed = math.max(now_us - updated_us, 0)
            local missing = math.max(capacity - tokens, 0)
            if elapsed * refill_units_per_us >= missing then
                tokens = capacity
            else
                tokens = tokens + elapsed * refill_units_per_us
            end
            -- The claim: the payment less what the refill has brought back since.
            local decayed, shows_payment = 0, true
            if paid_at_us then
                decayed = math.max(now_us - paid_at_us, 0) * refill_units_per_us
                shows_payment = updated_us >= paid_at_us
            end
            if shows_payment and decayed < cost and tokens < capacity then
                tokens = math.min(tokens + cost - decayed, capacity)
                redis.call('HSET', KEYS[k], ARGV[at], string.format('%d', tokens),
                    ARGV[at + 1], string.format('%d', now_us))
            end
            result[l] = tokens
        end
        at = at + 5
    end
end
return result
