-- wrk script for the benchmark (scripts/bench.sh): prints the run's summary as one line
-- of JSON after wrk's own report, which the bench program reads (bench/src/probe.rs). It
-- defines no request() or response() hook, so wrk keeps its fast path (one prebuilt
-- request, no Lua per response) and the load generator's cost stays what it is without
-- a script.
--
-- {"requests": N, "duration_us": N, "latency_us": {"p50": N, "p99": N, "max": N},
--  "errors": {"connect": N, "read": N, "write": N, "timeout": N, "status": N}}
-- where errors.status counts responses >= 400 (429 included) and the others are socket
-- errors.

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '{"requests": %d, "duration_us": %d, '
            .. '"latency_us": {"p50": %.0f, "p99": %.0f, "max": %.0f}, '
            .. '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}}\n',
        summary.requests, summary.duration,
        latency:percentile(50), latency:percentile(99), latency.max,
        e.connect, e.read, e.write, e.timeout, e.status))
end
