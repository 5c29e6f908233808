//! Logging: env_logger with a timestamp, level, module and instance name on every line.
//! `RUST_LOG` works as usual; the default is `info`.

use std::io::Write;

pub fn init(instance: &str) {
    let instance = instance.to_string();
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {:<5} {} [{}] {}",
                buf.timestamp_millis(),
                record.level(),
                record.module_path().unwrap_or("-"),
                instance,
                record.args()
            )
        })
        .try_init();
}
