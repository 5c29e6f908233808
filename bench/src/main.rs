//! `bench`: the program behind `scripts/bench.sh` (throughput, latency and CPU per request
//! of every process of the native topology) and `scripts/memory.sh` (an instance's resident
//! memory after a million client identities). The scripts check the tools, build the
//! binaries and stop whatever this program leaves running. What it runs is the library's
//! (`bench/src/lib.rs`).

use std::process::ExitCode;

use bench::{memory, throughput, warn};
use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let result = match Cli::parse().run {
        Run::Throughput(options) => throughput::run(options),
        Run::Memory(options) => {
            bench::set_name("memory");
            memory::run(options)
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
        ] {
            let parsed = Cli::try_parse_from(["bench"].into_iter().chain(args.split(' ')));
            assert!(parsed.is_ok(), "{args}: {parsed:?}");
        }
    }
}
