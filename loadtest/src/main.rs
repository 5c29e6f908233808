//! `loadtest`: drives the rate limiter from many client addresses and checks what it admitted.
//!
//! Every client is a distinct loopback source address (Linux routes all of 127.0.0.0/8 to
//! `lo`, so binding one needs no setup) with its own keep-alive connection pool, so the
//! service sees as many clients as there are sources. A client sends GET requests, or
//! with `--domain` calls Envoy's rate-limit service (`ShouldRateLimit`, over gRPC) with
//! the descriptors of `--descriptor`, `{client}` in a value being its own address. Requests go out either on a clock
//! (`--rate`, an open model: a slow server does not slow the offered rate, and sends that
//! fall behind or cannot go out are counted) or flat out (`--connections`). Every run is
//! bounded by a duration and a request count.
//!
//! The summary compares what each client was admitted with what a token bucket allows
//! over the time it was active, `C + r × t`, where the burst `C` and the refill `r` come
//! from the `RateLimit-Policy` response header (a gRPC answer's `current_limit`) or from
//! flags.
//!
//! # Layout
//! The library (`src/lib.rs`, shared with bench/): `policy`, the `RateLimit-Policy`
//! header and the per-client admission bounds; `summary`, the run's summary, printed for
//! a person, saved as JSON and checked. This binary, each module depending only on those
//! listed before it:
//! - [`sources`]: parsing of source address lists and ranges.
//! - [`schedule`]: the open-model clock arithmetic, in exact integers.
//! - [`cli`]: flags, and their validation into a [`cli::Config`] (bad flags exit with 2).
//! - [`stats`]: what the answers add up to, folded one sample at a time.
//! - [`plot`]: admitted and rejected per second, as a PNG.
//! - [`drive`]: the HTTP and gRPC clients, the dispatchers and the live progress line.
//!
//! It depends on external crates only; it talks to the service over HTTP or gRPC like
//! any other client would.

mod cli;
mod drive;
mod plot;
mod schedule;
mod sources;
mod stats;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = match cli::Cli::parse().into_config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("loadtest: error: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadtest: error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(drive::run(config)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("loadtest: error: {error:#}");
            ExitCode::from(1)
        }
    }
}
