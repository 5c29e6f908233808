//! HTTP clients with timeouts, so a hang fails a test instead of stalling it, and the
//! requests several suites make the same way.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use reqwest::{Client, RequestBuilder, Response};

use crate::TestApp;

/// A client with a short timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client")
}

/// A client whose requests come from `source` (any 127.0.0.0/8 address works on Linux).
pub fn client_from(source: IpAddr) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .local_address(source)
        .build()
        .expect("an HTTP client")
}

/// The header's value; empty when it is absent.
pub fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or("<not text>").to_string())
        .unwrap_or_default()
}

/// The legacy quota headers: `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
/// `X-RateLimit-Reset`, in that order, each empty when absent.
pub fn legacy_headers(response: &Response) -> [String; 3] {
    ["Limit", "Remaining", "Reset"].map(|name| header(response, &format!("X-RateLimit-{name}")))
}

/// How many of `attempts` requests built by `send`, sent one after the other, pass;
/// every answer must be a 200 or a 429.
pub async fn passes(attempts: usize, send: impl Fn() -> RequestBuilder) -> usize {
    let mut passed = 0;
    for _ in 0..attempts {
        let response = send().send().await.unwrap();
        let status = response.status().as_u16();
        assert!(status == 200 || status == 429, "status {status}");
        if status == 200 {
            passed += 1;
        }
    }
    passed
}

/// Sends every request at once; answers with each one's status and `X-RateLimit-Source`,
/// in the order given.
pub async fn all_at_once(requests: impl IntoIterator<Item = RequestBuilder>) -> Vec<(u16, String)> {
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                (
                    response.status().as_u16(),
                    header(&response, "X-RateLimit-Source"),
                )
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// Sends `request` and reads its answer's body as JSON; a transport error or a body that
/// is not JSON fails the test.
pub async fn json_of(request: RequestBuilder) -> serde_json::Value {
    let response = request.send().await.expect("an answer");
    let status = response.status();
    response
        .json()
        .await
        .unwrap_or_else(|err| panic!("a {status} answer whose body is not JSON: {err}"))
}

/// How many of `answers` (from [`all_at_once`]) were admitted, and each one's
/// `X-RateLimit-Source`, in order; every answer must be a decision, a 200 or a 429.
pub fn admitted(answers: Vec<(u16, String)>) -> (usize, Vec<String>) {
    let mut admitted = 0;
    let mut sources = Vec::with_capacity(answers.len());
    for (status, source) in answers {
        assert!(status == 200 || status == 429, "status {status} ({source})");
        admitted += usize::from(status == 200);
        sources.push(source);
    }
    (admitted, sources)
}

/// Sends `request()` every 50 ms until an answer says `X-RateLimit-Source: redis`; fails,
/// naming `what`, if none has by `deadline`.
pub async fn until_redis_decides(
    what: &str,
    deadline: Instant,
    request: impl Fn() -> RequestBuilder,
) {
    loop {
        let response = request().send().await.unwrap();
        if header(&response, "X-RateLimit-Source") == "redis" {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never went back to Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /metrics`, which must answer 200.
pub async fn metrics(client: &Client, app: &TestApp) -> String {
    let response = client.get(app.at("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The value of one sample line of a `/metrics` text; `None` when the series is absent,
/// which is not 0: a renamed metric, or `METRICS=off`, is absent too.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// A counter's value: 0 for a series never touched (prometheus-client writes a labelled
/// series only once it has counted), but only when its family is declared in `text`, so
/// a "stays 0" cannot pass because the metric is gone.
pub fn counter(text: &str, series: &str) -> f64 {
    let name = series.split('{').next().unwrap_or(series);
    let family = name.strip_suffix("_total").unwrap_or(name);
    assert!(
        text.lines().any(|line| line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split(' ').next())
            == Some(family)),
        "no metric family {family} in /metrics:\n{text}"
    );
    metric(text, series).unwrap_or(0.0)
}

/// `GET target` written as it is on a raw connection to `host:port` (so that no client
/// normalises the path first), answered by its status and whether an instance sent it
/// (`X-Instance`).
pub fn raw_get(host: &str, port: u16, target: &str) -> (u16, bool) {
    let stream = std::net::TcpStream::connect((host, port)).expect("connect");
    stream.set_read_timeout(Some(ANSWER_BOUND)).unwrap();
    let answer = exchange(stream, &format!("GET {target}"), &[]).to_lowercase();
    (status_of(&answer), answer.contains("\r\nx-instance:"))
}

/// `request` (`METHOD target`) with `headers` and no body, on a connection to the Unix
/// socket at `path`, which reqwest cannot open: the status and the body.
pub fn socket_request(
    path: &std::path::Path,
    request: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let stream = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(ANSWER_BOUND)).unwrap();
    let answer = exchange(stream, request, headers);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    (status_of(&answer), body)
}

/// How long a raw exchange may wait for its answer: only a hang takes this long.
const ANSWER_BOUND: Duration = Duration::from_secs(5);

/// Writes `request` as HTTP/1.1 with `Connection: close` and reads the whole answer.
fn exchange<S: std::io::Read + std::io::Write>(
    mut stream: S,
    request: &str,
    headers: &[(&str, &str)],
) -> String {
    use std::fmt::Write as _;
    let mut head = format!("{request} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .expect("write the request");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("an answer");
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}
