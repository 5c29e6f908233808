-- wrk script for the cluster phase of scripts/bench.sh: every request carries its own key in
-- X-Bench-Key, which the phase's policy keys its bucket by, so that one load generator on one
-- address spreads its decisions over many buckets (and, in Cluster mode, over every master),
-- as many clients would. Keys are numbers from 0, one per request, going round after KEYS:
-- a run of at least KEYS requests decides every key at least once.
--
-- Arguments (after `--`): KEYS (default 100000)
--
-- It reports as scripts/bench/report.lua does (its done() is this script's); unlike that
-- one, it has a request() hook, so wrk builds each request in Lua, which costs wrk CPU (the
-- load generator's column), not the service's.

dofile("scripts/bench/report.lua")

local keys = 100000
local sent = 0

function init(args)
    keys = tonumber(args[1]) or keys
end

function request()
    local key = sent % keys
    sent = sent + 1
    return wrk.format("GET", wrk.path, { ["X-Bench-Key"] = tostring(key) })
end
