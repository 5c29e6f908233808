//! The service on a Unix socket (`UNIX_SOCKET`), as the binary runs it: alone (`PORT=off`)
//! over a socket file a killed instance left behind, removed at stop; a path it cannot
//! bind stops the start with a message naming the setting and the path. What a request on
//! the socket counts against is in `tests/gateway/socket.rs`, through Nginx.

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::time::Duration;

use testkit::{send_signal, service_command, socket_request, wait_for_exit, wait_until};

#[test]
fn a_socket_path_that_cannot_be_bound_stops_the_start_naming_the_setting_and_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-folder/app.sock");
    let path_text = path.display().to_string();

    let mut child = service_command(0, &[("UNIX_SOCKET", &path_text)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the binary");
    let status = wait_for_exit(&mut child, Duration::from_secs(10))
        .expect("a socket it cannot bind stops the start at once");
    let stderr = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("UNIX_SOCKET: cannot listen on {path_text:?}: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn with_port_off_the_service_serves_on_its_socket_alone_over_a_stale_file_and_removes_it_at_stop() {
    // Arrange: the file an instance killed with SIGKILL leaves: a socket nobody listens on.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    drop(UnixListener::bind(&path).unwrap());
    let port = testkit::free_port();
    let mut child = service_command(
        port,
        &[
            ("PORT", "off"),
            ("UNIX_SOCKET", &path.display().to_string()),
            ("RUST_LOG", "warn"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("run the binary");

    // Act
    wait_until(
        "the service to listen on its socket",
        Duration::from_secs(10),
        || UnixStream::connect(&path).is_ok(),
    );
    let (health, _) = socket_request(&path, "GET /health", &[]);
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port));
    send_signal(child.id(), "TERM");
    let exit = wait_for_exit(&mut child, Duration::from_secs(15));

    // Assert
    assert_eq!(health, 200);
    assert!(tcp.is_err(), "PORT=off listens on no port");
    assert_eq!(exit.and_then(|status| status.code()), Some(0));
    assert!(!path.exists(), "the socket file is removed at stop");
}
