//! `bench`: the program behind `scripts/bench.sh` (throughput, latency and CPU per request
//! of every process of the native topology) and `scripts/memory.sh` (an instance's
//! resident memory after a million client identities). The scripts check the tools, build
//! the binaries and stop whatever this program leaves running; this program runs the
//! phases, reads what the load generators and the kernel report, and writes the tables and
//! the Markdown block of docs/BENCHMARKS.md.
//!
//! # Layout
//! - [`throughput`] and [`memory`]: the two runs, start to report; [`soak`], the soak of
//!   scripts/soak.sh.
//! - [`row`] and [`script`]: one measurement, one `redis-benchmark` run, as typed rows.
//! - [`report`]: the goals, the tables of medians and the block `--record` writes.
//! - [`stats`]: medians, spreads, number formats.
//! - Readers of structured output: [`wrk`] (the JSON line of scripts/bench/report.lua),
//!   [`loadgen`] (the load generator's `--json`), [`procfs`] (`/proc`), [`redis_info`]
//!   (`INFO`), [`prom`] (`/metrics`), [`http`] (a GET on loopback).
//! - [`spawn`]: the processes this program starts, recorded and stopped by pid.
//! - [`machine`], [`record`]: what a report says about where it ran; `--record`.

mod http;
mod loadgen;
mod machine;
mod memory;
mod procfs;
mod prom;
mod record;
mod redis_info;
mod report;
mod row;
mod script;
mod soak;
mod spawn;
mod stats;
mod throughput;
mod wrk;

use std::process::ExitCode;
use std::sync::OnceLock;

use clap::{Parser, Subcommand};

/// Every process of the benchmark listens on, and every request goes to, this address.
pub const LOOPBACK: &str = "127.0.0.1";

static NAME: OnceLock<&'static str> = OnceLock::new();

/// A progress line, named after the script the user ran ("bench: ...").
pub fn say(message: std::fmt::Arguments<'_>) {
    println!("{}: {message}", NAME.get().copied().unwrap_or("bench"));
}

pub fn warn(message: std::fmt::Arguments<'_>) {
    eprintln!("{}: {message}", NAME.get().copied().unwrap_or("bench"));
}

#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::say(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::warn(format_args!($($arg)*)) };
}

/// Runs the benchmarks of scripts/bench.sh and scripts/memory.sh (run those: they build
/// what this needs and clean up after it).
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
    let cli = Cli::parse();
    let result = match cli.run {
        Run::Throughput(options) => {
            let _ = NAME.set("bench");
            throughput::run(options)
        }
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
