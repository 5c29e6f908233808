-- wrk script for scripts/memory.sh: every request carries its own client identity in
-- X-Forwarded-For, which the instance believes because wrk's address (127.0.0.1) is its
-- trusted proxy. Identities are IPv4 addresses in 10.0.0.0/8, numbered from 0.
--
-- Arguments (after `--`): IDENTITIES THREADS [REPEAT_EVERY]
--   IDENTITIES    distinct identities in all, split evenly over the threads
--   THREADS       wrk's -t, so each thread knows its share
--   REPEAT_EVERY  every N-th identity sends a second request right after its first,
--                 which a one-token burst denies (so the deny cache fills); 0 = never
--
-- Once a thread has sent its share, its connections ask for /health, which touches no
-- bucket, until scripts/memory.sh sees every request answered and stops wrk (stopping a
-- thread from the script could drop the request being sent).

local next_thread_id = 0

function setup(thread)
    thread:set("thread_id", next_thread_id)
    next_thread_id = next_thread_id + 1
end

local first, count, every, planned
local sent = 0
-- wrk builds one request on the first thread's state before the run, only to check it
-- (script_verify_request); that one must not use up an identity, so each thread's first
-- request is a /health.
local checked = false

function init(args)
    local identities = tonumber(args[1]) or 1000000
    local threads = tonumber(args[2]) or 1
    every = tonumber(args[3]) or 0
    local per_thread = math.ceil(identities / threads)
    first = thread_id * per_thread
    count = math.max(0, math.min(per_thread, identities - first))
    if every > 0 then
        planned = math.floor(count / every) * (every + 1) + count % every
    else
        planned = count
    end
end

-- The identity of this thread's n-th request (from 0): groups of EVERY identities take
-- EVERY + 1 requests, the last identity of a group asking twice.
local function identity(n)
    if every <= 0 then
        return n
    end
    local group = math.floor(n / (every + 1))
    return group * every + math.min(n % (every + 1), every - 1)
end

local function address(id)
    return string.format("10.%d.%d.%d",
        math.floor(id / 65536) % 256, math.floor(id / 256) % 256, id % 256)
end

function request()
    if not checked or sent >= planned then
        checked = true
        return wrk.format("GET", "/health")
    end
    local id = first + identity(sent)
    sent = sent + 1
    return wrk.format("GET", wrk.path, { ["X-Forwarded-For"] = address(id) })
end
