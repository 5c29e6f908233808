//! The benchmark's library: the native topology as `scripts/cluster.sh` runs it, its
//! processes and the readers of what they say, and the benchmark's phases, measurement
//! and report. The `bench` binary (`scripts/bench.sh`, `scripts/memory.sh`) is its CLI;
//! the soak (`tests/soak/`, run by `scripts/soak.sh`) drives the same topology through it.
//!
//! # Layout
//! - [`phases`]: every phase of the benchmark as data; [`throughput`], the one loop that
//!   measures any of them; `measure`, one measurement as a JSON record; [`report`],
//!   every table rendered from the JSON records.
//! - [`memory`]: an instance's resident memory after many client identities.
//! - The topology: [`cluster`] (its ports from scripts/ports.env, shared with
//!   scripts/cluster.sh; scripts/cluster.sh up and down; its processes), [`node`] (Redis),
//!   `gateway` (Nginx: the gateway phase's own Nginxes and its checks).
//! - Readers and processes: [`probe`] (HTTP, /metrics, Nginx's log, wrk's JSON, an
//!   instance started alone), [`process`] (the one way to start, stop and measure a
//!   process: pid records, guards, `/proc`), [`machine`] (where a report ran and what).

pub mod cluster;
mod gateway;
pub mod machine;
mod measure;
pub mod memory;
pub mod node;
pub mod phases;
pub mod probe;
pub mod process;
pub mod report;
pub mod throughput;

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;

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

/// The script the user ran: `bench` unless [`set_name`] named another.
pub fn name() -> &'static str {
    NAME.get().copied().unwrap_or("bench")
}

/// Names the lines of [`say!`] and [`warn!`] after another script (once; later calls do
/// nothing).
pub fn set_name(name: &'static str) {
    let _ = NAME.set(name);
}

/// The `NAME=value` words of `text` as pairs (values hold no spaces).
fn env_pairs(text: &str) -> impl Iterator<Item = (&str, &str)> {
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
