//! `bench`: the program behind `scripts/bench.sh` (throughput, latency and CPU per request
//! of every process of the native topology), `scripts/memory.sh` (an instance's resident
//! memory after a million client identities) and `scripts/soak.sh` (load while the
//! topology is hurt, then a verdict). The scripts check the tools, build the binaries and
//! stop whatever this program leaves running.
//!
//! # Layout
//! - [`phases`]: every phase of the benchmark as data; [`throughput`], the one loop that
//!   measures any of them; [`measure`], one measurement as a JSON record; [`script`], the
//!   Lua script alone; [`report`], every table rendered from the JSON records.
//! - [`memory`], and [`soak`] with its pure verdict in `soak::judge`.
//! - The topology: [`cluster`] (its ports from scripts/ports.env, shared with
//!   scripts/cluster.sh; scripts/cluster.sh up and down; its processes), [`node`] (Redis),
//!   [`gateway`] (Nginx: the shipped configs' keepalive, the gateway phase's own Nginx and
//!   checks).
//! - Readers and processes: [`probe`] (HTTP, /metrics, Nginx's log, wrk's JSON, an
//!   instance started alone), [`process`] (the one way to start, stop and measure a
//!   process: pid records, guards, `/proc`), [`machine`] (where a report ran and what).

mod cluster;
mod gateway;
mod machine;
mod measure;
mod memory;
mod node;
mod phases;
mod probe;
mod process;
mod report;
mod soak;
mod throughput;

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;

use clap::{Parser, Subcommand};

/// Every process of the benchmark listens on, and every request goes to, this address.
pub const LOOPBACK: &str = "127.0.0.1";

static NAME: OnceLock<&'static str> = OnceLock::new();

/// A progress line, named after the script the user ran ("bench: ...").
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { println!("{}: {}", $crate::name(), format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { eprintln!("{}: {}", $crate::name(), format_args!($($arg)*)) };
}

/// The script the user ran: `bench` unless a subcommand set it.
pub fn name() -> &'static str {
    NAME.get().copied().unwrap_or("bench")
}

/// The `NAME=value` words of `text` as pairs (values hold no spaces).
pub fn env_pairs(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split_whitespace()
        .filter_map(|word| word.split_once('='))
}

/// A release binary of the workspace (CARGO_TARGET_DIR, else target/).
pub fn release_binary(root: &Path, name: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR");
    let target = target.map_or_else(|| root.join("target"), Into::into);
    target.join("release").join(name)
}

/// Appends `value` to a JSON-lines file.
pub fn append_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{}", serde_json::to_string(value)?)?;
    Ok(())
}

/// The load generator's `--json` summary in `path`.
pub fn read_summary(path: &Path) -> anyhow::Result<loadtest::summary::Summary> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path);
    let text = text.with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))
}

/// Runs the benchmarks of scripts/bench.sh, scripts/memory.sh and scripts/soak.sh (run
/// those: they build what this needs and clean up after it).
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
struct Cli {
    #[command(subcommand)]
    run: Run,
}

#[derive(Debug, Subcommand)]
enum Run {
    /// Throughput, latency and CPU per request of the native topology (scripts/bench.sh).
    Throughput(throughput::Options),
    /// Resident memory after many client identities (scripts/memory.sh).
    Memory(memory::Options),
    /// Steady load with master kills, restarts and a policy reload, then a verdict
    /// (scripts/soak.sh).
    Soak(soak::Options),
}

fn main() -> ExitCode {
    let result = match Cli::parse().run {
        Run::Throughput(options) => throughput::run(options),
        Run::Memory(options) => {
            let _ = NAME.set("memory");
            memory::run(options)
        }
        Run::Soak(options) => {
            let _ = NAME.set("soak");
            soak::run(options)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            warn!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_parses_its_defaults() {
        for args in [
            "throughput --phases allow,cluster",
            "memory --work-dir /tmp",
            "soak --minutes 2",
        ] {
            let parsed = Cli::try_parse_from(["bench"].into_iter().chain(args.split(' ')));
            assert!(parsed.is_ok(), "{args}: {parsed:?}");
        }
        assert!(Cli::try_parse_from(["bench", "soak", "--minutes", "1"]).is_err());
    }
}
