-- wrk script for scripts/bench.sh: prints the run's summary as one line that the script
-- parses. It defines no request() or response() hook, so wrk keeps its fast path (one
-- prebuilt request, no Lua per response) and the load generator's cost stays what it
-- is without a script.
--
-- Line: BENCH requests=N duration_us=N p50_us=N p99_us=N max_us=N
--       connect=N read=N write=N timeout=N status=N
-- where status counts responses >= 400 (429 included) and the others are socket errors.

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%d duration_us=%d p50_us=%.0f p99_us=%.0f max_us=%.0f "
            .. "connect=%d read=%d write=%d timeout=%d status=%d\n",
        summary.requests, summary.duration,
        latency:percentile(50), latency:percentile(99), latency.max,
        e.connect, e.read, e.write, e.timeout, e.status))
end
