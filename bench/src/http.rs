//! Just enough HTTP/1.1 to ask an instance on loopback for `/ready`, `/metrics` or a
//! header: one GET per connection (`Connection: close`), read to the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::LOOPBACK;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Names in lower case, in the order they came.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, value)| value.as_str())
    }

    /// Parses a whole response as the server sent it before closing.
    pub fn parse(raw: &[u8]) -> Result<Self> {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of the response's head")?;
        let head = String::from_utf8_lossy(&raw[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let mut response = Self {
            status,
            headers,
            body: String::new(),
        };
        let body = &raw[end + 4..];
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|value| value.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            dechunk(body)?
        } else {
            body.to_vec()
        };
        response.body = String::from_utf8_lossy(&body).into_owned();
        Ok(response)
    }
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk without its size line")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("a chunk of {size} bytes with {} left", body.len());
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

/// GET `path` from `LOOPBACK:port`, within `timeout` for each step.
pub fn get(port: u16, path: &str, timeout: Duration) -> Result<Response> {
    let address: SocketAddr = format!("{LOOPBACK}:{port}").parse()?;
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading GET {path} from {address}"))?;
    Response::parse(&raw).with_context(|| format!("GET {path} from {address}"))
}

/// Does `GET /ready` answer 200 on `port` (an instance)?
pub fn ready(port: u16) -> bool {
    get(port, "/ready", Duration::from_secs(2)).is_ok_and(|response| response.status == 200)
}

/// Does `GET /health` answer 200 on `port`? Nginx's public server answers `/ready` 404.
pub fn healthy(port: u16) -> bool {
    get(port, "/health", Duration::from_secs(2)).is_ok_and(|response| response.status == 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sized_response_is_split_into_status_headers_and_body() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\nRateLimit-Policy: \"default\";q=10;w=60\r\n\r\n{\"status\":\"ok\"}";
        let response = Response::parse(raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("ratelimit-policy"),
            Some("\"default\";q=10;w=60")
        );
        assert_eq!(response.body, "{\"status\":\"ok\"}");
    }

    #[test]
    fn a_chunked_body_is_joined() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n";
        let response = Response::parse(raw).unwrap();
        assert_eq!(response.status, 503);
        assert_eq!(response.body, "abcdefg");
    }

    #[test]
    fn a_response_without_a_head_is_an_error() {
        assert!(Response::parse(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(Response::parse(b"garbage\r\n\r\n").is_err());
    }
}
