//! The binary: load settings, start logging, serve. Errors end here as a message and an
//! exit code: 2 for bad configuration, 1 for anything else.

use std::process::ExitCode;

use ratelimiter::settings::Settings;
use ratelimiter::startup::Application;

fn main() -> ExitCode {
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("ratelimiter: invalid configuration:\n{err}");
            return ExitCode::from(2);
        }
    };
    // Kept to the end: its drop writes the lines still queued.
    let _log_writer =
        ratelimiter::telemetry::init(&settings.instance_name, settings.log_queue_lines);
    log::info!("starting: {settings}");
    let served = actix_rt::System::new().block_on(async move {
        let app = Application::build(settings)
            .await
            .map_err(|err| err.to_string())?;
        if let Some(port) = app.port() {
            log::info!("listening on port {port}");
        }
        if let Some(socket) = app.unix_socket() {
            log::info!("listening on the Unix socket {socket:?}");
        }
        if let Some(grpc_port) = app.grpc_port() {
            log::info!("Envoy's rate-limit service (gRPC) listening on port {grpc_port}");
        }
        app.run_until_stopped().await.map_err(|err| err.to_string())
    });
    match served {
        Ok(()) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(message) => {
            log::error!("{message}");
            eprintln!("ratelimiter: {message}");
            ExitCode::FAILURE
        }
    }
}
