//! The report of `scripts/bench.sh`: the goals read from the rows, the tables of medians,
//! the script table and the commands, as the Markdown block docs/BENCHMARKS.md records.
//! Pure: everything it says comes from its arguments.

use std::fmt::Write as _;

use crate::machine::Machine;
use crate::row::{Row, Via};
use crate::script::ScriptRow;
use crate::stats::{Spread, fmt_g, median, round_to};

/// Everything about the run that is not a measurement.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub started: String,
    pub machine: Machine,
    pub software: String,
    pub service: String,
    pub load_before: String,
    pub load_after: String,
    pub rounds: u32,
    pub duration_s: u32,
    pub threads: u32,
    pub elapsed_s: u64,
    pub quiet_max: u32,
    pub retaken: u32,
    pub still_busy: u32,
    /// `NAME=value` of the instance settings passed through beyond each phase's policy.
    pub instance_settings: Vec<String>,
    pub invocation: String,
    pub commands: Vec<String>,
    /// Each shipped Nginx config: its path and its text.
    pub nginx_configs: Vec<(String, String)>,
}

/// A column of the rows.
type Field = fn(&Row) -> f64;

const LIMITED: &str = "/limited_endpoint";
const ROOT: &str = "/";

/// How a figure over the rounds is summed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Median,
    Max,
    Sum,
}

/// The rows of one (phase, way in, path, connections), whatever the load generator.
fn matching<'a>(
    rows: &'a [Row],
    phase: &'a str,
    via: Via,
    path: &'a str,
    connections: u32,
) -> impl Iterator<Item = &'a Row> + 'a {
    rows.iter().filter(move |row| {
        row.phase == phase && row.via == via && row.path == path && row.connections == connections
    })
}

fn over_rounds(
    rows: &[Row],
    (phase, via, path, connections): (&str, Via, &str, u32),
    field: Field,
    how: Over,
) -> Option<f64> {
    let values: Vec<f64> = matching(rows, phase, via, path, connections)
        .map(field)
        .collect();
    if values.is_empty() {
        return None;
    }
    Some(match how {
        Over::Median => median(&values)?,
        Over::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Over::Sum => values.iter().sum(),
    })
}

/// `/limited_endpoint` ÷ `/` requests per second, round by round, rounded as printed.
pub fn ratio(rows: &[Row], phase: &str, via: Via, connections: u32) -> Option<Spread> {
    paired_ratio(rows, phase, (via, LIMITED), (via, ROOT), connections, |r| {
        r.per_second
    })
}

/// Admitted (200) requests per second: the requests per second, times the share of the
/// requests answered 200.
pub fn admitted_per_second(row: &Row) -> f64 {
    if row.requests == 0 {
        return 0.0;
    }
    row.per_second * row.ok.min(row.requests) as f64 / row.requests as f64
}

/// The path through the gateway and through the bench's own Nginx straight to the
/// upstream.
pub const GATEWAY_PATH: &str = "/api/items";

/// Admitted requests per second through the gateway ÷ through the bench's own Nginx
/// straight to the same upstream, round by round, rounded as printed.
pub fn gateway_ratio(rows: &[Row], connections: u32) -> Option<Spread> {
    paired_ratio(
        rows,
        "gateway",
        (Via::Gateway, GATEWAY_PATH),
        (Via::Proxy, GATEWAY_PATH),
        connections,
        admitted_per_second,
    )
}

/// `field` of one (way in, path) ÷ `field` of another, both of `phase` at `connections`,
/// paired round by round; the median and the spread of the ratios, rounded as printed.
fn paired_ratio(
    rows: &[Row],
    phase: &str,
    (top_via, top_path): (Via, &str),
    (bottom_via, bottom_path): (Via, &str),
    connections: u32,
    field: Field,
) -> Option<Spread> {
    let top: Vec<&Row> = matching(rows, phase, top_via, top_path, connections).collect();
    let pairs: Vec<(f64, f64)> = matching(rows, phase, bottom_via, bottom_path, connections)
        .filter_map(|bottom| {
            let over = top.iter().find(|row| row.round == bottom.round)?;
            Some((field(over), field(bottom)))
        })
        .collect();
    Spread::of_ratios(&pairs).map(|spread| Spread {
        median: round_to(spread.median, 2),
        low: round_to(spread.low, 2),
        high: round_to(spread.high, 2),
    })
}

fn text(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), fmt_g)
}

fn fixed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// "median (low–high)" pieces of a ratio, `-` when it was not measured.
fn spread_parts(spread: Option<Spread>) -> (String, String, String) {
    match spread {
        Some(s) => (
            format!("{:.2}", s.median),
            format!("{:.2}", s.low),
            format!("{:.2}", s.high),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    }
}

#[derive(Debug, Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
    Exactly(f64),
}

fn verdict(value: Option<f64>, goal: Goal) -> &'static str {
    let Some(v) = value else {
        return "not measured";
    };
    let met = match goal {
        Goal::AtLeast(g) => v >= g,
        Goal::AtMost(g) => v <= g,
        Goal::Exactly(g) => v == g,
    };
    if met { "met" } else { "MISSED" }
}

/// Goal 1 for one Nginx config: the line naming the keepalive, or what is missing.
pub fn keepalive_line(path: &str, config: &str) -> String {
    let directive = |words: &[&str]| -> Option<String> {
        config.lines().find_map(|line| {
            let found: Vec<&str> = line.split_whitespace().take(words.len()).collect();
            let matches = found.len() == words.len()
                && found.iter().zip(words).all(|(have, want)| match *want {
                    "N;" => have
                        .strip_suffix(';')
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
                    want => *have == want,
                });
            matches.then(|| line.trim_start().to_owned())
        })
    };
    let keepalive = directive(&["keepalive", "N;"]);
    let mut missing = Vec::new();
    if keepalive.is_none() {
        missing.push("keepalive N");
    }
    if directive(&["proxy_http_version", "1.1;"]).is_none() {
        missing.push("proxy_http_version 1.1");
    }
    if directive(&["proxy_set_header", "Connection", "\"\";"]).is_none() {
        missing.push("proxy_set_header Connection \"\"");
    }
    match keepalive {
        Some(line) if missing.is_empty() => format!("- `{path}`: `{line}` (met)"),
        _ => format!("- `{path}`: lacks {} (MISSED)", missing.join(" ")),
    }
}

fn script<'a>(scripts: &'a [ScriptRow], name: &str) -> Option<&'a ScriptRow> {
    scripts.iter().find(|row| row.name == name)
}

pub fn goals(info: &RunInfo, rows: &[Row], scripts: &[ScriptRow]) -> String {
    use Over::{Max, Median, Sum};
    use Via::{Direct, Nginx};
    let app: Field = |r| r.cpu.app;
    let master: Field = |r| r.cpu.master;
    let switches: Field = |r| r.switches_per_request;
    let calls: Field = |r| r.script_calls_per_request;
    let median_of = |key, field| over_rounds(rows, key, field, Median);
    let mut out = String::new();

    out.push_str("1. **Nginx upstream keepalive** (`keepalive N`, `proxy_http_version 1.1`, `Connection \"\"`) in every shipped config:\n");
    for (path, config) in &info.nginx_configs {
        let _ = writeln!(out, "   {}", keepalive_line(path, config));
    }

    let allow = ratio(rows, "allow", Nginx, 64);
    let (med, lo, hi) = spread_parts(allow);
    let others = over_rounds(rows, ("allow", Nginx, LIMITED, 64), |r| r.other as f64, Sum);
    let worst = over_rounds(rows, ("allow", Nginx, LIMITED, 64), |r| r.p99_ms, Max);
    let _ = write!(
        out,
        "2. **Through Nginx at 64 connections, allow-everything policy**: `/limited_endpoint` ÷ `/` = **{med}** (rounds: {lo}–{hi}; goal ≥ 0.6: {}); responses other than 200/429: **{}** (goal 0: {}); p99 median {} ms, worst {} ms (goal ≤ 10: {}).",
        verdict(allow.map(|s| s.median), Goal::AtLeast(0.6)),
        text(others),
        verdict(others, Goal::Exactly(0.0)),
        text(median_of(("allow", Nginx, LIMITED, 64), |r| r.p99_ms)),
        text(worst),
        verdict(worst, Goal::AtMost(10.0)),
    );
    let (med, lo, hi) = spread_parts(ratio(rows, "allow", Nginx, 16));
    let _ = write!(out, " At 16 connections: {med} ({lo}–{hi}).");
    let _ = write!(
        out,
        " Responses other than 200/429 in all {} measurements of the run: {}.",
        rows.len(),
        rows.iter().map(|r| r.other).sum::<u64>()
    );
    let (med, lo, hi) = spread_parts(ratio(rows, "mixed", Nginx, 64));
    let _ = writeln!(
        out,
        " Mixed policy over 241 clients at 64 connections: {med} ({lo}–{hi})."
    );

    let decision = median_of(("allow", Nginx, LIMITED, 64), app);
    let root = median_of(("allow", Nginx, ROOT, 64), app);
    let adds = decision.zip(root).map(|(d, r)| d - r);
    let _ = writeln!(
        out,
        "3. **App CPU per decision** (both instances, through Nginx at 64 connections, allow policy, the default Redis client): **{} µs** (goal ≤ 18: {}); per `/` request {} µs, so the decision itself adds {} µs. Directly at 64 connections: {} µs per decision, {} µs per `/`.",
        text(decision),
        verdict(decision, Goal::AtMost(18.0)),
        text(root),
        fixed(adds, 1),
        text(median_of(("allow", Direct, LIMITED, 64), app)),
        text(median_of(("allow", Direct, ROOT, 64), app)),
    );
    let pool = median_of(("allow-pool", Nginx, LIMITED, 64), app);
    let _ = writeln!(
        out,
        "   With `REDIS_CLIENT=pool` (r2d2 on tokio's blocking pool): **{} µs** per decision through Nginx ({}), {} µs directly; `/limited_endpoint` ÷ `/` through Nginx at 64 connections {}. Without Redis (one instance with the embedded store, directly, 64 connections): {} µs per decision, {} µs per `/`. Context switches per request through Nginx at 64 connections: {} per decision with the default client, {} with the pool, {} per `/`.",
        text(pool),
        verdict(pool, Goal::AtMost(18.0)),
        text(median_of(("allow-pool", Direct, LIMITED, 64), app)),
        spread_parts(ratio(rows, "allow-pool", Nginx, 64)).0,
        text(median_of(("memory-store", Direct, LIMITED, 64), app)),
        text(median_of(("memory-store", Direct, ROOT, 64), app)),
        text(median_of(("allow", Nginx, LIMITED, 64), switches)),
        text(median_of(("allow-pool", Nginx, LIMITED, 64), switches)),
        text(median_of(("allow", Nginx, ROOT, 64), switches)),
    );
    let (med, lo, hi) = spread_parts(ratio(rows, "metrics-off", Nginx, 64));
    let _ = writeln!(
        out,
        "   With `METRICS=off` (same policy, its own cluster, 64 connections): {} µs per decision and {} µs per `/` through Nginx (with metrics: {} and {}), {} and {} directly (with metrics: {} and {}); `/limited_endpoint` ÷ `/` through Nginx {med} ({lo}–{hi}).",
        text(median_of(("metrics-off", Nginx, LIMITED, 64), app)),
        text(median_of(("metrics-off", Nginx, ROOT, 64), app)),
        text(decision),
        text(root),
        text(median_of(("metrics-off", Direct, LIMITED, 64), app)),
        text(median_of(("metrics-off", Direct, ROOT, 64), app)),
        text(median_of(("allow", Direct, LIMITED, 64), app)),
        text(median_of(("allow", Direct, ROOT, 64), app)),
    );

    let usec = |name| script(scripts, name).map(|row| row.usec_per_call);
    let cpu = |name| script(scripts, name).map(|row| row.master_cpu);
    let allow_heavy = usec("allow-heavy");
    let reference = usec("reference").filter(|r| *r != 0.0);
    let versus = allow_heavy.zip(reference).map(|(v, r)| v / r);
    let anchored = versus.map(|x| round_to(x * 6.0, 1));
    let _ = writeln!(
        out,
        "4. **Redis CPU per decision** (`usec_per_call` of EVALSHA, redis-benchmark, replicas attached): allow-heavy (random keys, half of them new) **{} µs** (read against the goal of 5.5 µs as it stands: {}), a returning client {} µs, deny-heavy {} µs; master CPU from /proc {}, {} and {} µs per call. The reference script (two string keys, GET/GET/SETEX/SETEX; 6.0 µs on the anchors' machine) costs {} µs here on the same keys, so the script costs {}× the reference: **about {} µs** on the anchors' machine (goal ≤ 5.5: {}). Under HTTP load (allow policy, Nginx, 64 connections): {} µs per call, master {} µs per request.",
        fixed(allow_heavy, 2),
        verdict(allow_heavy, Goal::AtMost(5.5)),
        fixed(usec("returning"), 2),
        fixed(usec("deny-heavy"), 2),
        fixed(cpu("allow-heavy"), 1),
        fixed(cpu("returning"), 1),
        fixed(cpu("deny-heavy"), 1),
        fixed(usec("reference"), 2),
        fixed(versus, 2),
        fixed(anchored, 1),
        verdict(anchored, Goal::AtMost(5.5)),
        text(median_of(("allow", Nginx, LIMITED, 64), |r| r.usec_per_script_call)),
        text(median_of(("allow", Nginx, LIMITED, 64), master)),
    );

    let flood = ratio(rows, "flood", Nginx, 64);
    let (med, lo, hi) = spread_parts(flood);
    let flood_key = ("flood", Nginx, LIMITED, 64);
    let _ = write!(
        out,
        "5. **One client flooding through Nginx at 64 connections** (10 per 60 s), deny cache on: `/limited_endpoint` ÷ `/` = **{med}** ({lo}–{hi}; goal ≥ 0.9: {}), script calls per request {} (Nginx logged {} × 429 and {} × 200).",
        verdict(flood.map(|s| s.median), Goal::AtLeast(0.9)),
        text(median_of(flood_key, calls)),
        text(over_rounds(rows, flood_key, |r| r.denied as f64, Sum)),
        text(over_rounds(rows, flood_key, |r| r.ok as f64, Sum)),
    );
    let (med, lo, hi) = spread_parts(ratio(rows, "flood-nocache", Nginx, 64));
    let _ = writeln!(
        out,
        " With `DENY_CACHE_SIZE=0`: {med} ({lo}–{hi}), script calls per request {}.",
        text(median_of(("flood-nocache", Nginx, LIMITED, 64), calls)),
    );
    out.push_str("6. **Memory**: see the `scripts/memory.sh` section.\n");

    let two = |name: &'static str, one: &'static str| {
        usec(name).zip(usec(one)).map(|(two, one)| two / one)
    };
    let new_keys = two("allow-heavy, two limits", "allow-heavy");
    let returning = two("returning, two limits", "returning");
    let (med, lo, hi) = spread_parts(ratio(rows, "two-limits", Nginx, 64));
    let _ = writeln!(
        out,
        "7. **Two limits per decision** (one policy, one hash): Redis `usec_per_call` {} µs on random keys and {} µs for a returning client, against {} and {} µs for one limit: **{}×** and **{}×** (goal ≤ 1.4: {} and {}). Through Nginx at 64 connections, `/limited_endpoint` under the two-limit policy ÷ `/` = **{med}** ({lo}–{hi}); app CPU {} µs per decision (one limit: {}), Redis master {} µs per request.",
        fixed(usec("allow-heavy, two limits"), 2),
        fixed(usec("returning, two limits"), 2),
        fixed(allow_heavy, 2),
        fixed(usec("returning"), 2),
        fixed(new_keys, 2),
        fixed(returning, 2),
        verdict(new_keys, Goal::AtMost(1.4)),
        verdict(returning, Goal::AtMost(1.4)),
        text(median_of(("two-limits", Nginx, LIMITED, 64), app)),
        text(decision),
        text(median_of(("two-limits", Nginx, LIMITED, 64), master)),
    );

    let gateway = gateway_ratio(rows, 64);
    let (med, lo, hi) = spread_parts(gateway);
    let through = ("gateway", Via::Gateway, GATEWAY_PATH, 64);
    let straight = ("gateway", Via::Proxy, GATEWAY_PATH, 64);
    let sum = |key, field: Field| text(over_rounds(rows, key, field, Sum));
    let _ = writeln!(
        out,
        "8. **Gateway** (one policy on every path, per client address, 10^9 per 1 s, so every request runs the whole decision and is admitted; wrk on `{GATEWAY_PATH}` at 64 connections): admitted requests per second through the gateway ÷ Nginx proxying straight to the upstream = **{med}** ({lo}–{hi}) (goal ≥ 0.5: {}); {} admitted/s through the gateway, {} req/s straight (medians). CPU µs per request through the gateway: Nginx {}, instances {}, Redis master {}, demo upstream {}; straight: Nginx {}, demo upstream {}. Through the gateway Nginx logged {} × 200, {} × 429 and {} other, and the demo upstream counted {}; p99 {} ms through the gateway, {} ms straight.",
        verdict(gateway.map(|s| s.median), Goal::AtLeast(0.5)),
        text(median_of(through, admitted_per_second).map(|v| round_to(v, 0))),
        text(median_of(straight, admitted_per_second).map(|v| round_to(v, 0))),
        text(median_of(through, |r| r.cpu.nginx)),
        text(median_of(through, app)),
        text(median_of(through, master)),
        text(median_of(through, |r| r.cpu.upstream)),
        text(median_of(straight, |r| r.cpu.proxy)),
        text(median_of(straight, |r| r.cpu.upstream)),
        sum(through, |r| r.ok as f64),
        sum(through, |r| r.denied as f64),
        sum(through, |r| r.other as f64),
        sum(through, |r| r.upstream as f64),
        text(median_of(through, |r| r.p99_ms)),
        text(median_of(straight, |r| r.p99_ms)),
    );
    out
}

/// Groups rows by a key, in the order the keys first appear.
fn grouped<K: PartialEq>(rows: &[Row], key: impl Fn(&Row) -> K) -> Vec<(K, Vec<&Row>)> {
    let mut groups: Vec<(K, Vec<&Row>)> = Vec::new();
    for row in rows {
        let k = key(row);
        match groups.iter_mut().find(|(have, _)| *have == k) {
            Some((_, members)) => members.push(row),
            None => groups.push((k, vec![row])),
        }
    }
    groups
}

fn median_by(rows: &[&Row], field: Field) -> f64 {
    let values: Vec<f64> = rows.iter().map(|row| field(row)).collect();
    median(&values).unwrap_or(0.0)
}

/// Medians over the rounds of each (phase, load generator, way in, path, connections).
pub fn summary_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| phase | load | via | path | conns | req/s | p50 ms | p99 ms | max ms | 200 | 429 | other | app µs/req | Nginx µs/req | Redis master µs/req | replicas µs/req | sentinels µs/req | demo upstream µs/req | load gen µs/req | other processes % | script calls/req | Redis µs/call |\n\
         |---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let groups = grouped(rows, |r| {
        (
            r.phase.clone(),
            r.tool,
            r.via,
            r.path.clone(),
            r.connections,
        )
    });
    for ((phase, tool, via, path, connections), members) in groups {
        let calls = median_by(&members, |r| r.script_calls_per_request);
        let usec = if calls >= 0.01 {
            format!("{:.2}", median_by(&members, |r| r.usec_per_script_call))
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "| {phase} | {tool} | {via} | `{path}` | {connections} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {calls:.3} | {usec} |",
            median_by(&members, |r| r.per_second),
            median_by(&members, |r| r.p50_ms),
            median_by(&members, |r| r.p99_ms),
            members.iter().map(|r| r.max_ms).fold(0.0, f64::max),
            members.iter().map(|r| r.ok).sum::<u64>(),
            members.iter().map(|r| r.denied).sum::<u64>(),
            members.iter().map(|r| r.other).sum::<u64>(),
            median_by(&members, |r| r.cpu.app),
            // The cluster's Nginx, or the bench's own one for the `proxy` rows (the other
            // one idles meanwhile).
            median_by(&members, |r| r.cpu.nginx + r.cpu.proxy),
            median_by(&members, |r| r.cpu.master),
            median_by(&members, |r| r.cpu.replicas),
            median_by(&members, |r| r.cpu.sentinels),
            median_by(&members, |r| r.cpu.upstream),
            median_by(&members, |r| r.cpu.load_generator),
            median_by(&members, |r| r.others_percent),
        );
    }
    out
}

/// Where the instances spend their CPU: medians per (phase, way in, path, connections).
pub fn detail_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| phase | via | path | conns | app user µs/req | app system µs/req | context switches/req | threads |\n\
         |---|---|---|--:|--:|--:|--:|--:|\n",
    );
    let groups = grouped(rows, |r| {
        (r.phase.clone(), r.via, r.path.clone(), r.connections)
    });
    for ((phase, via, path, connections), members) in groups {
        let _ = writeln!(
            out,
            "| {phase} | {via} | `{path}` | {connections} | {:.1} | {:.1} | {:.2} | {:.0} |",
            median_by(&members, |r| r.app_user),
            median_by(&members, |r| r.app_system),
            median_by(&members, |r| r.switches_per_request),
            median_by(&members, |r| r.threads as f64).trunc(),
        );
    }
    out
}

pub fn script_table(scripts: &[ScriptRow]) -> String {
    let mut out = String::from(
        "| case | calls | usec_per_call | TIME | HMGET | HSET | PEXPIRE | engine | master CPU µs/call (/proc) | client CPU µs/call | calls/s |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for row in scripts {
        out.push_str(&row.markdown());
        out.push('\n');
    }
    out
}

/// The whole report: the block `--record` writes into docs/BENCHMARKS.md.
pub fn render(info: &RunInfo, rows: &[Row], scripts: &[ScriptRow]) -> String {
    let m = &info.machine;
    let others: Vec<f64> = rows.iter().map(|r| r.others_percent).collect();
    let highest = others.iter().copied().fold(0.0, f64::max);
    let settings = if info.instance_settings.is_empty() {
        "defaults".to_owned()
    } else {
        info.instance_settings.join(" ")
    };
    let mut out = String::new();
    let _ = writeln!(out, "## Run of {}\n", info.started);
    let _ = writeln!(
        out,
        "- Machine: {} cores, {}, kernel {}, {} MiB RAM",
        m.cores, m.model, m.kernel, m.memory_mib
    );
    let _ = writeln!(out, "- Software: {}", info.software);
    let _ = writeln!(out, "- Service: {}", info.service);
    let _ = writeln!(
        out,
        "- Load average before/after: {} / {}; the \"other processes\" column is the CPU every process outside the topology and the load generator used during each measurement, in % of all cores",
        info.load_before, info.load_after
    );
    let _ = writeln!(
        out,
        "- {} rounds of {} s per measurement, wrk with {} thread(s); whole run {} s",
        info.rounds, info.duration_s, info.threads, info.elapsed_s
    );
    let _ = writeln!(
        out,
        "- Measurements taken again because other processes used more than {}% of the machine: {}; kept although still above it: {}",
        info.quiet_max, info.retaken, info.still_busy
    );
    let _ = writeln!(
        out,
        "- CPU used by processes outside the benchmark during the kept measurements: median {}%, highest {}% of the machine",
        text(median(&others)),
        fmt_g(highest)
    );
    let _ = writeln!(
        out,
        "- Instance settings beyond each phase's policy: {settings}\n"
    );
    out.push_str("### Goals\n\n");
    out.push_str(&goals(info, rows, scripts));
    out.push_str("\n### Medians over the rounds\n\n");
    out.push_str("CPU columns are µs of CPU time (user + system, from `/proc/PID/stat`) per answered request; \"app\" is both instances together; \"Nginx\" is the cluster's, and the bench's own one (straight to the demo upstream) on the gateway phase's `proxy` rows. \"other\" counts statuses other than 200 and 429 plus socket errors. \"script calls/req\" is EVALSHA+EVAL seen by the master per answered request; \"Redis µs/call\" their `usec` ÷ `calls` from `INFO commandstats`.\n\n");
    out.push_str(&summary_table(rows));
    out.push_str("\n### Where the instances spend their CPU (medians)\n\n");
    out.push_str("User and system time of both instances per answered request, their threads' context switches per request (voluntary + involuntary, threads alive at the end), and their thread count at the end.\n\n");
    out.push_str(&detail_table(rows));
    out.push_str("\n### The Lua script alone (redis-benchmark, 200000 calls, 50 clients, replicas attached)\n\n");
    out.push_str("`usec_per_call` of EVALSHA includes the commands the script runs; their own `usec` per script call follows, and \"engine\" is the rest (the Lua call, its argument tables, the arithmetic, the reply). The floor row is a script that only returns `{1, 0}` with the same arguments; the reference row is `scripts/bench/reference_token_bucket.lua` (its own commands, GET and SETEX, are counted in neither column nor \"engine\"). The client column is redis-benchmark's own CPU per call: what one event-loop client (C, hiredis) spends per round trip on this machine.\n\n");
    out.push_str(&script_table(scripts));
    out.push_str("\n### Commands\n\n`PASSWORD` stands for REDIS_PASSWORD; the embedded-store instance listens on a free port.\n\n```sh\n");
    let _ = writeln!(out, "{}", info.invocation);
    for command in &info.commands {
        let _ = writeln!(out, "{command}");
    }
    out.push_str("```\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{GroupCpu, Tool};

    fn row(phase: &str, round: u32, via: Via, path: &str, per_second: f64, app: f64) -> Row {
        Row {
            phase: phase.into(),
            round,
            tool: Tool::Wrk,
            via,
            path: path.into(),
            connections: 64,
            requests: (per_second * 5.0) as u64,
            seconds: 5.0,
            per_second,
            p50_ms: 1.0,
            p99_ms: 3.0 + f64::from(round) / 10.0,
            max_ms: 9.0,
            ok: (per_second * 5.0) as u64,
            denied: 0,
            other: 0,
            upstream: 0,
            cpu: GroupCpu {
                app,
                nginx: 14.8,
                master: 8.8,
                replicas: 2.6,
                sentinels: 0.1,
                load_generator: 5.4,
                ..GroupCpu::default()
            },
            others_percent: f64::from(round),
            script_calls_per_request: if path == LIMITED { 1.0 } else { 0.0 },
            usec_per_script_call: if path == LIMITED { 6.2 } else { 0.0 },
            commands_per_request: 1.0,
            app_user: 8.8,
            app_system: 7.0,
            switches_per_request: 0.33,
            threads: 12,
        }
    }

    /// Three rounds of the allow phase through Nginx: ratios 0.55, 0.56 and 0.58.
    fn allow_rows() -> Vec<Row> {
        vec![
            row("allow", 1, Via::Nginx, LIMITED, 39050.0, 15.9),
            row("allow", 1, Via::Nginx, ROOT, 71000.0, 8.7),
            row("allow", 2, Via::Nginx, ROOT, 70000.0, 8.8),
            row("allow", 2, Via::Nginx, LIMITED, 39200.0, 15.8),
            row("allow", 3, Via::Nginx, LIMITED, 41180.0, 15.7),
            row("allow", 3, Via::Nginx, ROOT, 71000.0, 8.6),
        ]
    }

    #[test]
    fn the_ratio_pairs_the_two_paths_round_by_round() {
        let spread = ratio(&allow_rows(), "allow", Via::Nginx, 64).unwrap();
        assert_eq!(spread.median, 0.56);
        assert_eq!(spread.low, 0.55);
        assert_eq!(spread.high, 0.58);
        assert_eq!(ratio(&allow_rows(), "flood", Via::Nginx, 64), None);
    }

    #[test]
    fn the_summary_table_has_one_line_of_medians_per_target() {
        let table = summary_table(&allow_rows());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(
            lines[2],
            "| allow | wrk | nginx | `/limited_endpoint` | 64 | 39200 | 1.00 | 3.20 | 9.00 | 597150 | 0 | 0 | 15.8 | 14.8 | 8.8 | 2.6 | 0.1 | 0.0 | 5.4 | 2 | 1.000 | 6.20 |"
        );
        assert!(
            lines[3].starts_with("| allow | wrk | nginx | `/` | 64 | 71000 |"),
            "{}",
            lines[3]
        );
        assert!(lines[3].ends_with("| 0.000 | - |"), "{}", lines[3]);
    }

    #[test]
    fn the_detail_table_groups_without_the_load_generator() {
        let mut rows = allow_rows();
        let mut other_tool = row("allow", 4, Via::Nginx, ROOT, 70000.0, 8.7);
        other_tool.tool = Tool::Loadtest;
        rows.push(other_tool);
        let table = detail_table(&rows);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(
            table.contains("| allow | nginx | `/` | 64 | 8.8 | 7.0 | 0.33 | 12 |"),
            "{table}"
        );
    }

    #[test]
    fn goals_read_the_figures_against_their_targets() {
        let info = RunInfo {
            nginx_configs: vec![(
                "nginx/nginx.conf.template".into(),
                "upstream x {\n    keepalive 64;\n}\nproxy_http_version 1.1;\nproxy_set_header Connection \"\";\n".into(),
            )],
            ..info()
        };
        let goals = goals(&info, &allow_rows(), &[]);
        assert!(
            goals.contains("   - `nginx/nginx.conf.template`: `keepalive 64;` (met)\n"),
            "{goals}"
        );
        assert!(
            goals.contains("= **0.56** (rounds: 0.55–0.58; goal ≥ 0.6: MISSED)"),
            "{goals}"
        );
        assert!(
            goals.contains("p99 median 3.2 ms, worst 3.3 ms (goal ≤ 10: met)"),
            "{goals}"
        );
        assert!(
            goals.contains("**15.8 µs** (goal ≤ 18: met); per `/` request 8.7 µs, so the decision itself adds 7.1 µs"),
            "{goals}"
        );
        assert!(
            goals.contains("in all 6 measurements of the run: 0."),
            "{goals}"
        );
        assert!(goals.contains("allow-heavy (random keys, half of them new) **- µs** (read against the goal of 5.5 µs as it stands: not measured)"), "{goals}");
        assert!(goals.contains("At 16 connections: - (-–-)."), "{goals}");
    }

    /// Three rounds of the gateway phase: the gateway admits 0.52, 0.50 and 0.55 of what
    /// Nginx straight to the upstream answers.
    fn gateway_rows() -> Vec<Row> {
        let mut rows = Vec::new();
        for (round, gateway, proxy) in [
            (1, 10400.0, 20000.0),
            (2, 10000.0, 20000.0),
            (3, 11000.0, 20000.0),
        ] {
            let mut through = row("gateway", round, Via::Gateway, GATEWAY_PATH, gateway, 30.0);
            through.upstream = through.ok;
            through.cpu.upstream = 12.0;
            let mut straight = row("gateway", round, Via::Proxy, GATEWAY_PATH, proxy, 0.0);
            straight.cpu.proxy = 20.0;
            straight.cpu.nginx = 0.0;
            straight.cpu.upstream = 11.0;
            rows.push(through);
            rows.push(straight);
        }
        rows
    }

    #[test]
    fn the_summary_table_shows_the_benchs_nginx_and_the_upstream_on_proxy_rows() {
        let table = summary_table(&gateway_rows());
        let proxy = table.lines().find(|l| l.contains("| proxy |")).unwrap();
        assert!(
            proxy.contains("| 0.0 | 20.0 | 8.8 | 2.6 | 0.1 | 11.0 | 5.4 |"),
            "{proxy}"
        );
    }

    #[test]
    fn the_gateway_ratio_pairs_admitted_requests_round_by_round() {
        let rows = gateway_rows();
        let spread = gateway_ratio(&rows, 64).unwrap();
        assert_eq!((spread.median, spread.low, spread.high), (0.52, 0.5, 0.55));
        // Half the answers through the gateway were not 200: half the rate is admitted.
        let mut rows = rows;
        for row in rows.iter_mut().filter(|r| r.via == Via::Gateway) {
            row.ok = row.requests / 2;
        }
        assert_eq!(gateway_ratio(&rows, 64).unwrap().median, 0.26);
        assert_eq!(gateway_ratio(&allow_rows(), 64), None);
    }

    #[test]
    fn admitted_requests_per_second_count_only_200s() {
        let mut r = row("gateway", 1, Via::Gateway, GATEWAY_PATH, 1000.0, 1.0);
        assert_eq!(admitted_per_second(&r), 1000.0);
        r.ok = r.requests / 4;
        assert_eq!(admitted_per_second(&r), 250.0);
        r.requests = 0;
        assert_eq!(admitted_per_second(&r), 0.0);
    }

    #[test]
    fn the_gateway_finding_names_the_ratio_and_the_cpu_of_each_process() {
        let found = goals(&info(), &gateway_rows(), &[]);
        let line = found
            .lines()
            .find(|l| l.starts_with("8. **Gateway**"))
            .unwrap();
        assert!(line.contains("= **0.52** (0.50–0.55) (goal ≥ 0.5: met); 10400 admitted/s through the gateway, 20000 req/s straight"), "{line}");
        assert!(line.contains("through the gateway: Nginx 14.8, instances 30, Redis master 8.8, demo upstream 12; straight: Nginx 20, demo upstream 11."), "{line}");
        assert!(line.contains("Nginx logged 157000 × 200, 0 × 429 and 0 other, and the demo upstream counted 157000"), "{line}");
        let missed = goals(&info(), &allow_rows(), &[]);
        assert!(
            missed.contains("= **-** (-–-) (goal ≥ 0.5: not measured)"),
            "{missed}"
        );
    }

    #[test]
    fn a_config_without_keepalive_is_named() {
        assert_eq!(
            keepalive_line("x.conf", "keepalive_timeout 4s;\nproxy_http_version 1.1;\n"),
            "- `x.conf`: lacks keepalive N proxy_set_header Connection \"\" (MISSED)"
        );
    }

    fn info() -> RunInfo {
        RunInfo {
            started: "2026-11-27 11:49 UTC".into(),
            machine: Machine {
                cores: 2,
                model: "Intel(R) Xeon(R) Processor".into(),
                kernel: "6.18".into(),
                memory_mib: 24105,
            },
            software: "nginx/1.22.1; Redis server v=7.0.15; wrk 4.1.0".into(),
            service: "target/release/ratelimiter".into(),
            load_before: "0.1 0.2 0.3".into(),
            load_after: "1.0 0.5 0.4".into(),
            rounds: 3,
            duration_s: 1,
            threads: 1,
            elapsed_s: 60,
            quiet_max: 15,
            retaken: 0,
            still_busy: 0,
            instance_settings: vec![],
            invocation: "scripts/bench.sh --duration 1".into(),
            commands: vec!["wrk -t1 -c64 -d1s http://127.0.0.1:8000/".into()],
            nginx_configs: vec![],
        }
    }

    #[test]
    fn the_report_starts_with_the_run_and_ends_with_its_commands() {
        let report = render(&info(), &allow_rows(), &[]);
        assert!(report.starts_with("## Run of 2026-11-27 11:49 UTC\n\n- Machine: 2 cores, Intel(R) Xeon(R) Processor, kernel 6.18, 24105 MiB RAM\n"), "{report}");
        assert!(
            report.contains("median 2%, highest 3% of the machine\n"),
            "{report}"
        );
        assert!(
            report.contains(
                "- Instance settings beyond each phase's policy: defaults\n\n### Goals\n\n1. "
            ),
            "{report}"
        );
        assert!(report.ends_with("```sh\nscripts/bench.sh --duration 1\nwrk -t1 -c64 -d1s http://127.0.0.1:8000/\n```\n"), "{report}");
    }
}
