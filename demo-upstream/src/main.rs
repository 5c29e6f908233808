//! `demo-upstream`: the application behind the gateway in the native cluster
//! (`scripts/cluster.sh up --gateway`) and in Compose (`--profile gateway`); see the crate
//! docs of its library.

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;
use clap::Parser;

/// Answers every path with 200 and counts what reached it.
#[derive(Debug, Parser)]
#[command(name = "demo-upstream", version)]
struct Cli {
    /// Where the gateway sends admitted requests; every path answers 200 and is counted.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Where `GET /__upstream/count` shows the counts (and `GET /health` answers 200).
    #[arg(long, default_value = "127.0.0.1:8082")]
    count_listen: SocketAddr,
    /// Worker threads of the counted listener (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bind = |addr: SocketAddr| {
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))
    };
    let (app, counts) = (bind(cli.listen)?, bind(cli.count_listen)?);
    let workers = cli
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let upstream = demo_upstream::DemoUpstream::listen(app, counts, workers)?;
    eprintln!(
        "demo-upstream: answering on {}, counts on http://{}/__upstream/count",
        cli.listen, cli.count_listen
    );
    upstream.run().await?;
    Ok(())
}
