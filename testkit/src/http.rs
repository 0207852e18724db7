//! A raw HTTP/1.1 client for targeted requests: write exact bytes, read one
//! response ([`Conn`], [`request`]), or `GET` a path ([`get`]). Loopback only.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Bound on one HTTP request (connect + write + read).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response head or body the raw client accepts.
const MAX_RESPONSE: usize = 1024 * 1024;

/// A response as read from the wire.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body (Content-Length bytes, or up to EOF without one).
    pub body: Vec<u8>,
}

impl Response {
    /// Value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `X-Baton-Pid`.
    pub fn pid(&self) -> Option<u32> {
        self.header("x-baton-pid")?.trim().parse().ok()
    }

    /// `X-Baton-Generation`.
    pub fn generation(&self) -> Option<u64> {
        self.header("x-baton-generation")?.trim().parse().ok()
    }

    /// Whether the server said `Connection: close`.
    pub fn close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection to a server on loopback, for targeted requests.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl Conn {
    /// Connect to `addr` (loopback only).
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        assert!(
            addr.ip().is_loopback(),
            "tests only talk to loopback, not {addr}"
        );
        let stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Write raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Read one response, within `timeout`.
    pub fn read_response(&mut self, timeout: Duration) -> io::Result<Response> {
        let deadline = Instant::now() + timeout;
        let (head_len, status, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (n, parsed.code.unwrap_or(0), headers);
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_RESPONSE => {
                    return Err(io::Error::other("response head too large"));
                }
                Ok(httparse::Status::Partial) => {
                    if !self.fill(deadline)? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "connection closed before a complete response head (got {:?})",
                                String::from_utf8_lossy(&self.buf)
                            ),
                        ));
                    }
                }
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "bad response head {:?}: {e}",
                        String::from_utf8_lossy(&self.buf)
                    )))
                }
            }
        };
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| {
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n <= MAX_RESPONSE)
                    .ok_or_else(|| io::Error::other(format!("bad Content-Length {v:?}")))
            })
            .transpose()?;
        let end = match length {
            Some(length) => {
                let end = head_len + length;
                while self.buf.len() < end {
                    if !self.fill(deadline)? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before the end of the body",
                        ));
                    }
                }
                end
            }
            None => {
                while self.fill(deadline)? {
                    if self.buf.len() > head_len + MAX_RESPONSE {
                        return Err(io::Error::other("response body too large"));
                    }
                }
                self.buf.len()
            }
        };
        let body = self.buf[head_len..end].to_vec();
        self.buf.drain(..end);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Read more bytes; false on EOF.
    fn fill(&mut self, deadline: Instant) -> io::Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "response timeout"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 16 * 1024];
        // Bounded: only EINTR repeats.
        for _ in 0..100 {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("read interrupted too often"))
    }
}

/// One request on a new connection: write `raw`, read one response.
pub fn request(addr: SocketAddr, raw: &[u8]) -> io::Result<Response> {
    let mut conn = Conn::connect(addr)?;
    conn.send(raw)?;
    conn.read_response(REQUEST_TIMEOUT)
}

/// What `GET` answered: status and who answered.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `X-Baton-Generation`.
    pub generation: Option<u64>,
    /// `X-Baton-Pid`.
    pub pid: Option<u32>,
    /// Body text.
    pub body: String,
}

/// `GET path` on a new connection with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Reply> {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: baton-test\r\nConnection: close\r\n\r\n");
    let response = request(addr, raw.as_bytes())?;
    Ok(Reply {
        status: response.status,
        generation: response.generation(),
        pid: response.pid(),
        body: response.text(),
    })
}
