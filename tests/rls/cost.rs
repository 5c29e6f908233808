//! What a decision costs through each front: decisions per second, and CPU per decision of
//! the two instances (the release binary, two processes) and of the Redis master, for
//! `POST /v1/decide` and for `ShouldRateLimit` with one and with two descriptors, on the
//! same instances and Redis, one after the other, each phase flat out from the same number
//! of callers. Each HTTP caller has a connection of its own (HTTP/1.1 answers one request
//! at a time); the gRPC callers either do too, or share one HTTP/2 connection per
//! instance, as Envoy multiplexes its calls. Every decision is admitted (a returning client whose bucket never fills
//! between its calls), so each asks Redis. A measurement, not a check: ignored by default,
//! run on its own in release mode, bounded in time and count.
//!
//! ```text
//! cargo test --release -p ratelimiter --test rls cost -- --ignored --nocapture
//! ```
//!
//! `RLS_COST_SECONDS` (per phase, at most 30; default 5), `RLS_COST_CALLERS` (default 32)
//! and `RLS_COST_ROUNDS` (each round runs every phase once; default 2) change what is
//! measured.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

use crate::service::{Running, start_binary};
use testkit::{
    RedisProcess, RlsClient, RlsFiles, client_from, cpu_us, descriptor, rls_request, unique_prefix,
    wait_until,
};

/// Hard bounds of one phase, whatever the environment says.
const MOST_SECONDS: u64 = 30;
const MOST_DECISIONS: u64 = 2_000_000;

/// A limit per user and one per org that no phase can spend.
const RULES: &str = "\
domain: bench
descriptors:
  - key: user
    rate_limit: { unit: day, requests_per_unit: 100000000 }
  - key: org
    rate_limit: { unit: day, requests_per_unit: 100000000 }
";

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |value| {
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?}: a number"))
    })
}

/// How the gRPC callers reach an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Connections {
    /// A connection per caller.
    Own,
    /// One connection per instance, shared by its callers' streams.
    Shared,
}

/// What a phase asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Front {
    /// `POST /v1/decide` of `rls:bench` and the key `user=<n>`: the bucket a
    /// one-descriptor call spends.
    Decide,
    /// `ShouldRateLimit` of the descriptor `user=<n>`.
    OneDescriptor(Connections),
    /// `ShouldRateLimit` of `user=<n>` and `org=<n>`, decided together.
    TwoDescriptors(Connections),
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Decide => "HTTP POST /v1/decide, a connection per caller",
            Front::OneDescriptor(Connections::Own) => "gRPC, 1 descriptor, a connection per caller",
            Front::TwoDescriptors(Connections::Own) => {
                "gRPC, 2 descriptors, a connection per caller"
            }
            Front::OneDescriptor(Connections::Shared) => {
                "gRPC, 1 descriptor, a connection per instance"
            }
            Front::TwoDescriptors(Connections::Shared) => {
                "gRPC, 2 descriptors, a connection per instance"
            }
        }
    }
}

/// The two instances and what to ask them at.
struct Instances {
    processes: [Running; 2],
    http: [u16; 2],
    grpc: [u16; 2],
}

/// `callers` callers, caller `n` asking instance `n % 2` about its own user (and org) back
/// to back until `deadline`; how many decisions were made.
async fn drive(instances: &Instances, front: Front, callers: u64, deadline: Instant) -> u64 {
    let per_connection = MOST_DECISIONS / callers;
    let shared = [
        RlsClient::connect(instances.grpc[0]).await,
        RlsClient::connect(instances.grpc[1]).await,
    ];
    let tasks: Vec<_> = (0..callers)
        .map(|n| {
            let instance = (n % 2) as usize;
            let (http_port, grpc_port) = (instances.http[instance], instances.grpc[instance]);
            let shared = shared[instance].clone();
            let user = format!("user=u{n}");
            tokio::spawn(async move {
                let mut decided = 0;
                match front {
                    Front::Decide => {
                        let source = Ipv4Addr::new(127, 0, 2, 1 + n as u8);
                        let http = client_from(IpAddr::V4(source));
                        let url = format!("http://127.0.0.1:{http_port}/v1/decide");
                        let body = format!(r#"{{"policy":"rls:bench","key":["{user}"]}}"#);
                        while Instant::now() < deadline && decided < per_connection {
                            let response = http
                                .post(&url)
                                .header("content-type", "application/json")
                                .body(body.clone())
                                .send()
                                .await
                                .unwrap();
                            assert_eq!(response.status(), 200);
                            let answer = response.text().await.unwrap();
                            assert!(answer.contains(r#""allowed":true"#), "{answer}");
                            decided += 1;
                        }
                    }
                    Front::OneDescriptor(connections) | Front::TwoDescriptors(connections) => {
                        let mut rls = match connections {
                            Connections::Own => RlsClient::connect(grpc_port).await,
                            Connections::Shared => shared,
                        };
                        let org = format!("o{n}");
                        let (key, value) = user.split_once('=').unwrap();
                        while Instant::now() < deadline && decided < per_connection {
                            let mut descriptors = vec![descriptor(&[(key, value)])];
                            if let Front::TwoDescriptors(_) = front {
                                descriptors.push(descriptor(&[("org", &org)]));
                            }
                            let response = rls.ask(rls_request("bench", descriptors)).await;
                            assert_eq!(response.unwrap().overall_code(), Code::Ok);
                            decided += 1;
                        }
                    }
                }
                decided
            })
        })
        .collect();
    let mut decided = 0;
    for task in tasks {
        decided += task.await.unwrap();
    }
    decided
}

struct Phase {
    decisions: u64,
    elapsed: Duration,
    instances_cpu_us: u64,
    redis_cpu_us: u64,
    script_calls: u64,
}

impl Phase {
    fn instances_us(&self) -> f64 {
        self.instances_cpu_us as f64 / self.decisions as f64
    }

    fn redis_us(&self) -> f64 {
        self.redis_cpu_us as f64 / self.decisions as f64
    }
}

fn script_calls(redis: &RedisProcess) -> u64 {
    redis.command_calls("evalsha") + redis.command_calls("eval")
}

async fn phase(
    redis: &RedisProcess,
    instances: &Instances,
    front: Front,
    callers: u64,
    seconds: u64,
) -> Phase {
    let pids = instances.processes.each_ref().map(|process| process.0.id());
    let instances_cpu = || pids.iter().map(|pid| cpu_us(*pid)).sum::<u64>();
    // Connections open and scripts loaded before anything is counted.
    drive(
        instances,
        front,
        callers,
        Instant::now() + Duration::from_millis(500),
    )
    .await;
    let (instances_before, redis_before) = (instances_cpu(), cpu_us(redis.pid()));
    let calls_before = script_calls(redis);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds.min(MOST_SECONDS));
    let decisions = drive(instances, front, callers, deadline).await;
    Phase {
        decisions,
        elapsed: started.elapsed(),
        instances_cpu_us: instances_cpu() - instances_before,
        redis_cpu_us: cpu_us(redis.pid()) - redis_before,
        script_calls: script_calls(redis) - calls_before,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it on its own in release mode, see the module's doc"]
async fn cost() {
    let redis = RedisProcess::server(None, &[]);
    // As the shipped topologies run: the master's effects are replicated.
    let replicas = [
        RedisProcess::server(Some(redis.port), &[]),
        RedisProcess::server(Some(redis.port), &[]),
    ];
    wait_until(
        "the replicas to be in sync",
        Duration::from_secs(10),
        || {
            let info: String = redis.command(&["INFO", "replication"]);
            info.matches("state=online").count() == replicas.len()
        },
    );
    let files = RlsFiles::new("bench.yaml", RULES);
    let (url, folder, prefix) = (redis.url(), files.folder(), unique_prefix("rls-cost"));
    let vars = [
        ("REDIS_URL", url.as_str()),
        ("RLS_CONFIG", folder.as_str()),
        ("KEY_PREFIX", prefix.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let ((first, http_1, grpc_1), (second, http_2, grpc_2)) =
        (start_binary(&vars), start_binary(&vars));
    let instances = Instances {
        processes: [first, second],
        http: [http_1, http_2],
        grpc: [grpc_1, grpc_2],
    };
    let seconds = setting("RLS_COST_SECONDS", 5);
    let callers = setting("RLS_COST_CALLERS", 32).clamp(1, 250);
    let rounds = setting("RLS_COST_ROUNDS", 2).clamp(1, 5);
    println!(
        "round | front | callers | decisions/s | instances CPU µs/decision | master CPU µs/decision | script calls/decision"
    );
    for round in 1..=rounds {
        let mut measured = Vec::new();
        for front in [
            Front::Decide,
            Front::OneDescriptor(Connections::Own),
            Front::TwoDescriptors(Connections::Own),
            Front::OneDescriptor(Connections::Shared),
            Front::TwoDescriptors(Connections::Shared),
        ] {
            let phase = phase(&redis, &instances, front, callers, seconds).await;
            println!(
                "{round} | {} | {callers} | {:.0} | {:.1} | {:.2} | {:.3}",
                front.name(),
                phase.decisions as f64 / phase.elapsed.as_secs_f64(),
                phase.instances_us(),
                phase.redis_us(),
                phase.script_calls as f64 / phase.decisions as f64,
            );
            measured.push(phase);
        }
        let [decide, one, two, one_shared, two_shared] = &measured[..] else {
            unreachable!("five phases")
        };
        for (connections, one, two) in [
            ("a connection per caller", one, two),
            ("a connection per instance", one_shared, two_shared),
        ] {
            println!(
                "{round} | goals, gRPC with {connections} | instances: gRPC 1 descriptor / HTTP decide = {:.2} (goal ≤ 1) | master: 2 descriptors / 1 = {:.2} (goal ≤ 1.4)",
                one.instances_us() / decide.instances_us(),
                two.redis_us() / one.redis_us(),
            );
        }
    }
}
