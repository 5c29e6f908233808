//! Commands run to their end within a bound: a command that hangs is killed and named,
//! never waited for forever. `docker` and `docker-compose` go through here.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `command` to its end, at most `limit`, and returns its output whatever its exit
/// status; an error names the command when it cannot start or runs out of time (it is
/// killed then).
pub fn try_run(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_bounded(&mut child, limit).map_err(|e| format!("{shown}: {e}"))?;
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// [`try_run`], panicking on its error.
pub fn run(command: &mut Command, limit: Duration) -> Output {
    try_run(command, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// A pipe read to its end on a thread of its own, so that a chatty command never blocks.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Waits for `child` at most `limit`, then kills it.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not finish within {limit:?}; killed"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What a command printed, stdout then stderr, without carriage returns.
pub fn text(output: &Output) -> String {
    let mut all = String::from_utf8_lossy(&output.stdout).into_owned();
    all.push_str(&String::from_utf8_lossy(&output.stderr));
    all.replace('\r', "")
}

/// `docker ARGS`, at most 60 s.
pub fn docker(args: &[&str]) -> Output {
    run(Command::new("docker").args(args), Duration::from_secs(60))
}

/// `docker ARGS`, which must succeed; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let output = docker(args);
    assert!(
        output.status.success(),
        "docker {}: {}",
        args.join(" "),
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}
