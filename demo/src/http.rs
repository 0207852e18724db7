//! Sans-IO HTTP/1.1 for the demo server.
//!
//! Bytes in, requests out; responses in, bytes out. Nothing here does I/O or
//! knows about a runtime, so the tokio, smol and mio backends all drive the
//! same code and a comparison between backends compares runtimes, not HTTP
//! stacks. Bad input yields an error status, never a panic.

use std::time::Duration;

/// Largest request head (request line + headers) we accept; larger -> 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body we accept; larger -> 413.
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest delay `/sleep/<ms>` accepts; above this -> 400.
pub const MAX_SLEEP_MS: u64 = 60_000;

/// The kind of handover item an HTTP connection moves to the next
/// generation as (every backend uses it, so connections move between
/// runtimes too); its payload is [`RequestReader::take_unread`].
pub const MOVED_KIND: &str = "http";

/// Most headers in one request; more -> 431.
const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (size plus extensions); longer is malformed (400).
const MAX_CHUNK_LINE: usize = 1024;

/// Who is answering; goes into every response as X-Baton-Pid / X-Baton-Generation / X-Baton-Backend.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Process id of the server answering.
    pub pid: u32,
    /// Upgrade generation of that process (0 for the first one).
    pub generation: u64,
    /// Name of the backend driving this module ("tokio", "smol", "mio").
    pub backend: &'static str,
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, as sent (case-sensitive, e.g. "GET").
    pub method: String,
    /// Request target, as sent (may include a query string).
    pub path: String,
    /// Whether the client wants the connection kept open after the response.
    pub keep_alive: bool,
    /// Body, already de-chunked.
    pub body: Vec<u8>,
}

/// Connection-level parser state: bytes in, requests out. Handles pipelining (several requests in one read).
///
/// Between requests it holds no memory: the buffer is released as soon as
/// it holds no byte of a next request, and the head of a request whose body
/// is still arriving is boxed, so an idle reader is a few words inside the
/// connection's state (thousands of idle keep-alive connections each hold
/// one).
#[derive(Debug, Default)]
pub struct RequestReader {
    /// Bytes received and not yet consumed by a returned request; no
    /// allocation when empty.
    buf: Vec<u8>,
    /// Head of the request whose body is still arriving, so the head is parsed once.
    pending: Option<Box<Pending>>,
    /// Once a request is bad the byte stream cannot be resynchronised, so the
    /// error sticks and every later call returns it.
    error: Option<u16>,
}

/// A parsed head waiting for its body.
#[derive(Debug)]
struct Pending {
    method: String,
    path: String,
    keep_alive: bool,
    /// Length of the head in `buf`; the body starts here.
    head_len: usize,
    body: BodyKind,
}

/// How the body of a request is delimited.
#[derive(Debug)]
enum BodyKind {
    /// `Content-Length` (0 when absent).
    Length(usize),
    /// `Transfer-Encoding: chunked`, decoded incrementally so a body arriving
    /// in many small reads is not rescanned from its start each time.
    Chunked(ChunkState),
}

/// Progress through a chunked body.
#[derive(Debug, Default)]
struct ChunkState {
    /// Offset in `buf` of the next chunk-size line.
    pos: usize,
    /// Data of the chunks decoded so far.
    body: Vec<u8>,
}

impl RequestReader {
    /// An empty reader, for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the socket.
    pub fn push(&mut self, data: &[u8]) {
        // After an error the connection is closing; keeping bytes would only use memory.
        if self.error.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Next complete request, if the buffer holds one. Ok(None): need more bytes.
    /// Err(status): the request is bad; the caller answers with `error_response(status)` and closes.
    pub fn next_request(&mut self) -> Result<Option<Request>, u16> {
        if let Some(status) = self.error {
            return Err(status);
        }
        let result = self.advance();
        if let Err(status) = result {
            self.error = Some(status);
            self.pending = None;
            self.buf = Vec::new();
        }
        result
    }

    /// True when no byte of a next request has arrived (the connection is idle between requests).
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty()
    }

    /// Take the bytes received and not yet returned as a request (a
    /// pipelined or partial one), leaving the reader empty: what a
    /// connection that moves to the next generation carries with it, to be
    /// [`push`](Self::push)ed into a new reader there, which parses them as
    /// this one would have.
    pub fn take_unread(&mut self) -> Vec<u8> {
        // The parsed head of a partial request is still in `buf`: parsed again there.
        self.pending = None;
        std::mem::take(&mut self.buf)
    }

    /// Parse as far as the buffer allows; consume exactly one request's bytes when complete.
    fn advance(&mut self) -> Result<Option<Request>, u16> {
        if self.pending.is_none() {
            match parse_head(&self.buf)? {
                Some(pending) => self.pending = Some(Box::new(pending)),
                None => return Ok(None),
            }
        }
        let Some(pending) = self.pending.as_mut() else {
            return Ok(None);
        };
        let (body, end) = match &mut pending.body {
            BodyKind::Length(len) => {
                let end = pending.head_len.saturating_add(*len);
                match self.buf.get(pending.head_len..end) {
                    Some(body) => (body.to_vec(), end),
                    None => return Ok(None),
                }
            }
            BodyKind::Chunked(state) => match decode_chunks(&self.buf, state)? {
                Some(end) => (std::mem::take(&mut state.body), end),
                None => return Ok(None),
            },
        };
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        // Consume exactly this request's bytes: what follows is the next pipelined request.
        self.buf.drain(..end.min(self.buf.len()));
        if self.buf.is_empty() {
            // Nothing of a next request: give the memory back, so an idle
            // connection holds no buffer.
            self.buf = Vec::new();
        }
        Ok(Some(Request {
            method: pending.method,
            path: pending.path,
            keep_alive: pending.keep_alive,
            body,
        }))
    }
}

/// Parse the request head at the start of `buf`. Ok(None): the head is not complete yet.
fn parse_head(buf: &[u8]) -> Result<Option<Pending>, u16> {
    // Never look past MAX_HEAD: a head that does not end within it is too large.
    let window = buf.get(..buf.len().min(MAX_HEAD)).unwrap_or_default();
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(431),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(431),
        Err(_) => return Err(400),
    };

    let mut close = false;
    let mut keep_alive_token = false;
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut codings: Vec<Vec<u8>> = Vec::new();
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',').map(trim) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(header.value).ok_or(400u16)?;
            // Disagreeing lengths make the framing ambiguous: refuse rather than guess.
            if content_length.is_some_and(|prev| prev != n) {
                return Err(400);
            }
            content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            codings.extend(
                header
                    .value
                    .split(|&b| b == b',')
                    .map(trim)
                    .filter(|t| !t.is_empty())
                    .map(<[u8]>::to_ascii_lowercase),
            );
        }
    }

    let body = if transfer_encoding {
        // Both framings at once is the classic request-smuggling shape.
        if content_length.is_some() {
            return Err(400);
        }
        match codings.as_slice() {
            [only] if only.as_slice() == b"chunked" => BodyKind::Chunked(ChunkState {
                pos: head_len,
                body: Vec::new(),
            }),
            [] => return Err(400),
            _ => return Err(501),
        }
    } else {
        let len = content_length.unwrap_or(0);
        if len > MAX_BODY as u64 {
            return Err(413);
        }
        BodyKind::Length(usize::try_from(len).map_err(|_| 413u16)?)
    };

    let http11 = req.version.unwrap_or(1) == 1;
    Ok(Some(Pending {
        method: req.method.unwrap_or_default().to_owned(),
        path: req.path.unwrap_or_default().to_owned(),
        keep_alive: !close && (http11 || keep_alive_token),
        head_len,
        body,
    }))
}

/// Content-Length value: ASCII digits only (no sign, no list). Huge values saturate,
/// so they are reported as too large (413) rather than malformed.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = trim(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// Continue decoding the chunked body from `state.pos`. Ok(Some(end)): the body and
/// its trailers are complete and end at offset `end` of `buf`.
fn decode_chunks(buf: &[u8], state: &mut ChunkState) -> Result<Option<usize>, u16> {
    loop {
        let rest = buf.get(state.pos..).unwrap_or_default();
        let Some(line_len) = find_crlf(rest, MAX_CHUNK_LINE) else {
            return if rest.len() > MAX_CHUNK_LINE + 1 {
                Err(400)
            } else {
                Ok(None)
            };
        };
        let size = parse_chunk_size(rest.get(..line_len).unwrap_or_default())?;
        let data_start = line_len + 2;
        let after_line = rest.get(data_start..).unwrap_or_default();
        if size == 0 {
            return Ok(skip_trailers(after_line)?.map(|n| state.pos + data_start + n));
        }
        if state.body.len().saturating_add(size) > MAX_BODY {
            return Err(413);
        }
        let Some(data) = after_line.get(..size) else {
            return Ok(None);
        };
        match after_line.get(size..size + 2) {
            Some(b"\r\n") => {}
            Some(_) => return Err(400),
            None => return Ok(None),
        }
        state.body.extend_from_slice(data);
        state.pos += data_start + size + 2;
    }
}

/// Chunk size in hex; extensions after `;` are ignored. Larger than MAX_BODY -> 413.
fn parse_chunk_size(line: &[u8]) -> Result<usize, u16> {
    let size_part = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = trim(size_part);
    if digits.is_empty() {
        return Err(400);
    }
    let mut size: usize = 0;
    for &b in digits {
        let digit = char::from(b).to_digit(16).ok_or(400u16)?;
        // Stop as soon as it is too large, so the arithmetic cannot overflow.
        size = size * 16 + digit as usize;
        if size > MAX_BODY {
            return Err(413);
        }
    }
    Ok(size)
}

/// Skip the trailer section after the last chunk. Ok(Some(n)): it ends after `n` bytes.
fn skip_trailers(data: &[u8]) -> Result<Option<usize>, u16> {
    let mut pos = 0;
    loop {
        let rest = data.get(pos..).unwrap_or_default();
        let Some(line_len) = find_crlf(rest, MAX_HEAD) else {
            return if data.len() > MAX_HEAD {
                Err(431)
            } else {
                Ok(None)
            };
        };
        pos += line_len + 2;
        if line_len == 0 {
            return Ok(Some(pos));
        }
        if pos > MAX_HEAD {
            return Err(431);
        }
    }
}

/// Offset of the first CRLF in `data`, looking at most `limit` bytes into it plus the CRLF.
fn find_crlf(data: &[u8], limit: usize) -> Option<usize> {
    let window = data.get(..data.len().min(limit + 2)).unwrap_or_default();
    window.windows(2).position(|w| w == b"\r\n")
}

/// Strip optional whitespace (spaces and tabs) around a header token.
fn trim(bytes: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ws(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ws(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// One response, before serialisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Value of the Content-Type header.
    pub content_type: &'static str,
    /// Body bytes; Content-Length is derived from them.
    pub body: Vec<u8>,
}

/// What the server does with a request: answer now, or after a delay (the /sleep route: in-flight work).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this response now.
    Respond(Response),
    /// Wait `delay` (without blocking other connections), then send `then`.
    Sleep {
        /// How long to wait before answering.
        delay: Duration,
        /// The response to send after the delay.
        then: Response,
    },
}

/// Route a request. Pure function.
pub fn handle(request: &Request, info: &ServerInfo) -> Action {
    crate::stats::count();
    let method = request.method.as_str();
    if !matches!(method, "GET" | "POST" | "HEAD") {
        return Action::Respond(error_response(501));
    }
    // Route on the path alone; a query string does not change the resource.
    let path = request.path.split('?').next().unwrap_or_default();
    let get = method == "GET";
    let response = match path {
        "/" if get => text(200, hello_body(info)),
        "/health" if get => text(200, "ok\n".to_owned()),
        "/stats" if get => text(200, format!("requests {}\n", crate::stats::total())),
        "/echo" if method == "POST" => Response {
            status: 200,
            content_type: "application/octet-stream",
            body: request.body.clone(),
        },
        "/" | "/health" | "/echo" | "/stats" => error_response(405),
        _ => match path.strip_prefix("/sleep/") {
            Some(_) if !get => error_response(405),
            Some(ms) => match parse_sleep_ms(ms) {
                Some(ms) => {
                    return Action::Sleep {
                        delay: Duration::from_millis(ms),
                        then: text(200, format!("slept {ms} ms\n")),
                    }
                }
                None => error_response(400),
            },
            None => error_response(404),
        },
    };
    Action::Respond(response)
}

/// Milliseconds for `/sleep/<ms>`: decimal digits, at most MAX_SLEEP_MS.
fn parse_sleep_ms(ms: &str) -> Option<u64> {
    if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ms.parse().ok().filter(|&ms| ms <= MAX_SLEEP_MS)
}

/// A text/plain response.
fn text(status: u16, body: String) -> Response {
    Response {
        status,
        content_type: "text/plain",
        body: body.into_bytes(),
    }
}

/// Response for a protocol error status (400, 404, 405, 413, 431, 501, 408...).
pub fn error_response(status: u16) -> Response {
    text(status, format!("{status} {}\n", reason_phrase(status)))
}

/// Reason phrase for the status line; "Unknown" for codes the demo never sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Serialise a response: status line, Content-Length, Content-Type, X-Baton-Pid, X-Baton-Generation,
/// X-Baton-Backend, and `Connection: close` when `close` is true (else `Connection: keep-alive`).
pub fn encode(response: &Response, info: &ServerInfo, close: bool, out: &mut Vec<u8>) {
    let head = format!(
        "HTTP/1.1 {} {}\r\n\
         Content-Length: {}\r\n\
         Content-Type: {}\r\n\
         X-Baton-Pid: {}\r\n\
         X-Baton-Generation: {}\r\n\
         X-Baton-Backend: {}\r\n\
         Connection: {}\r\n\r\n",
        response.status,
        reason_phrase(response.status),
        response.body.len(),
        response.content_type,
        info.pid,
        info.generation,
        info.backend,
        if close { "close" } else { "keep-alive" },
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&response.body);
}

/// The body of `/` for this server: exactly `hello from pid {pid} generation {generation} backend {backend}\n`.
pub fn hello_body(info: &ServerInfo) -> String {
    format!(
        "hello from pid {} generation {} backend {}\n",
        info.pid, info.generation, info.backend
    )
}

#[cfg(test)]
mod tests {
    //! Routes, every error status, framing (pipelining, chunked, splits at any
    //! byte) and a property test that arbitrary bytes never panic or invent body.

    use super::*;
    use proptest::prelude::*;

    fn info() -> ServerInfo {
        ServerInfo {
            pid: 42,
            generation: 3,
            backend: "test",
        }
    }

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            keep_alive: true,
            body: Vec::new(),
        }
    }

    fn status_of(action: Action) -> u16 {
        match action {
            Action::Respond(r) => r.status,
            Action::Sleep { then, .. } => then.status,
        }
    }

    /// Feed `bytes` in one push and return the first result.
    fn parse_one(bytes: &[u8]) -> Result<Option<Request>, u16> {
        let mut reader = RequestReader::new();
        reader.push(bytes);
        reader.next_request()
    }

    fn parse_ok(bytes: &[u8]) -> Request {
        match parse_one(bytes) {
            Ok(Some(r)) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn route_hello() {
        let action = handle(&req("GET", "/"), &info());
        let expected = Response {
            status: 200,
            content_type: "text/plain",
            body: b"hello from pid 42 generation 3 backend test\n".to_vec(),
        };
        assert_eq!(action, Action::Respond(expected));
    }

    #[test]
    fn route_hello_ignores_query() {
        assert_eq!(status_of(handle(&req("GET", "/?x=1"), &info())), 200);
    }

    #[test]
    fn route_health() {
        let action = handle(&req("GET", "/health"), &info());
        assert_eq!(action, Action::Respond(text(200, "ok\n".to_owned())));
    }

    #[test]
    fn route_sleep() {
        let action = handle(&req("GET", "/sleep/250"), &info());
        assert_eq!(
            action,
            Action::Sleep {
                delay: Duration::from_millis(250),
                then: text(200, "slept 250 ms\n".to_owned()),
            }
        );
        let max = format!("/sleep/{MAX_SLEEP_MS}");
        assert!(matches!(
            handle(&req("GET", &max), &info()),
            Action::Sleep { .. }
        ));
    }

    #[test]
    fn route_sleep_bad_ms() {
        let too_long = format!("/sleep/{}", MAX_SLEEP_MS + 1);
        for path in [
            "/sleep/",
            "/sleep/abc",
            "/sleep/-1",
            "/sleep/+5",
            "/sleep/99999999999999999999999",
            too_long.as_str(),
        ] {
            assert_eq!(status_of(handle(&req("GET", path), &info())), 400, "{path}");
        }
    }

    #[test]
    fn route_echo() {
        let mut request = req("POST", "/echo");
        request.body = b"\x00binary\xff".to_vec();
        let expected = Response {
            status: 200,
            content_type: "application/octet-stream",
            body: request.body.clone(),
        };
        assert_eq!(handle(&request, &info()), Action::Respond(expected));
    }

    #[test]
    fn route_wrong_method_405() {
        for (method, path) in [
            ("POST", "/"),
            ("POST", "/health"),
            ("GET", "/echo"),
            ("POST", "/sleep/10"),
            ("HEAD", "/"),
        ] {
            assert_eq!(
                status_of(handle(&req(method, path), &info())),
                405,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn route_unknown_path_404() {
        for path in ["/nope", "/sleep", "/health/", "*"] {
            assert_eq!(status_of(handle(&req("GET", path), &info())), 404, "{path}");
        }
    }

    #[test]
    fn route_unknown_method_501() {
        for method in ["DELETE", "PUT", "get", "BREW"] {
            assert_eq!(
                status_of(handle(&req(method, "/"), &info())),
                501,
                "{method}"
            );
        }
    }

    #[test]
    fn error_responses_name_their_status() {
        for status in [400, 404, 405, 408, 413, 431, 501] {
            let response = error_response(status);
            assert_eq!(response.status, status);
            assert_eq!(response.content_type, "text/plain");
            let body = String::from_utf8(response.body).unwrap_or_default();
            assert!(body.starts_with(&format!("{status} ")), "{body}");
            assert_ne!(reason_phrase(status), "Unknown");
        }
    }

    #[test]
    fn encode_keep_alive_and_close() {
        let mut out = Vec::new();
        encode(&text(200, "ok\n".to_owned()), &info(), false, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\
              X-Baton-Pid: 42\r\nX-Baton-Generation: 3\r\nX-Baton-Backend: test\r\n\
              Connection: keep-alive\r\n\r\nok\n"
                .to_vec()
        );
        out.clear();
        encode(&error_response(404), &info(), true, &mut out);
        let text = String::from_utf8(out).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n404 Not Found\n"), "{text}");
    }

    #[test]
    fn parse_simple_get() {
        let request = parse_ok(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(request, {
            let mut r = req("GET", "/health");
            r.keep_alive = true;
            r
        });
    }

    #[test]
    fn parse_content_length_body() {
        let request = parse_ok(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(request.body, b"hello");
        // The same length twice agrees, so it is fine.
        let request =
            parse_ok(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(request.body, b"hi");
    }

    #[test]
    fn keep_alive_rules() {
        let cases: [(&[u8], bool); 6] = [
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                b"GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
                false,
            ),
        ];
        for (bytes, keep_alive) in cases {
            let request = parse_ok(bytes);
            assert_eq!(
                request.keep_alive,
                keep_alive,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn need_more_bytes() {
        assert_eq!(parse_one(b""), Ok(None));
        assert_eq!(parse_one(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(
            parse_one(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel"),
            Ok(None)
        );
    }

    #[test]
    fn bad_request_400() {
        let cases: [&[u8]; 9] = [
            b"\x00\x01garbage\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n",
        ];
        for bytes in cases {
            assert_eq!(
                parse_one(bytes),
                Err(400),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn body_too_large_413() {
        let head = format!(
            "POST /echo HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse_one(head.as_bytes()), Err(413));
        let huge = b"POST /echo HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(parse_one(huge), Err(413));
        // Exactly MAX_BODY is allowed: it waits for the body.
        let head = format!("POST /echo HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n");
        assert_eq!(parse_one(head.as_bytes()), Ok(None));
    }

    #[test]
    fn too_many_headers_431() {
        let mut bytes = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            bytes.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        assert_eq!(parse_one(&bytes), Err(431));
    }

    #[test]
    fn head_too_large_431() {
        // No end of head within MAX_HEAD bytes.
        let mut bytes = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        bytes.resize(MAX_HEAD, b'a');
        assert_eq!(parse_one(&bytes), Err(431));
        // One byte less is still waiting for more.
        bytes.pop();
        assert_eq!(parse_one(&bytes), Ok(None));
    }

    #[test]
    fn head_of_exactly_max_head_is_accepted() {
        let mut bytes = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        bytes.resize(MAX_HEAD - 4, b'a');
        bytes.extend_from_slice(b"\r\n\r\n");
        assert_eq!(bytes.len(), MAX_HEAD);
        assert_eq!(parse_ok(&bytes).path, "/");
    }

    #[test]
    fn other_transfer_encoding_501() {
        for te in ["gzip", "gzip, chunked", "chunked, chunked"] {
            let bytes = format!("POST /echo HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(parse_one(bytes.as_bytes()), Err(501), "{te}");
        }
    }

    #[test]
    fn chunked_decode_with_extensions_and_trailers() {
        let bytes = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n\
                      5;name=value\r\nhello\r\n\
                      1 \r\n \r\n\
                      A\r\n0123456789\r\n\
                      0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n";
        let request = parse_ok(bytes);
        assert_eq!(request.body, b"hello 0123456789");
        let empty = parse_ok(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(empty.body, b"");
    }

    #[test]
    fn chunked_malformed_400() {
        let cases: [&[u8]; 4] = [
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n;ext\r\n",
        ];
        for bytes in cases {
            assert_eq!(
                parse_one(bytes),
                Err(400),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        // A size line that never ends.
        let mut bytes = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1".to_vec();
        bytes.resize(bytes.len() + MAX_CHUNK_LINE + 2, b'0');
        assert_eq!(parse_one(&bytes), Err(400));
    }

    #[test]
    fn chunked_too_large_413() {
        let too_big = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse_one(too_big.as_bytes()), Err(413));
        let overflow =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\n";
        assert_eq!(parse_one(overflow), Err(413));
        // Two chunks that are fine alone but too large together.
        let half = MAX_BODY / 2 + 1;
        let mut bytes = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..2 {
            bytes.extend_from_slice(format!("{half:x}\r\n").as_bytes());
            bytes.resize(bytes.len() + half, b'a');
            bytes.extend_from_slice(b"\r\n");
        }
        assert_eq!(parse_one(&bytes), Err(413));
    }

    #[test]
    fn errors_are_sticky() {
        let mut reader = RequestReader::new();
        reader.push(b"BAD\x00 / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(reader.next_request(), Err(400));
        reader.push(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(reader.next_request(), Err(400));
    }

    #[test]
    fn pipelined_in_one_push() {
        let mut reader = RequestReader::new();
        reader.push(
            b"GET / HTTP/1.1\r\n\r\n\
              POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
              POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
              GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        let mut got = Vec::new();
        while let Ok(Some(request)) = reader.next_request() {
            got.push(request);
        }
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].path, "/");
        assert_eq!(got[1].body, b"abc");
        assert_eq!(got[2].body, b"de");
        assert_eq!(got[3].path, "/health");
        assert!(!got[3].keep_alive);
        assert!(reader.is_idle());
        assert_eq!(reader.next_request(), Ok(None));
    }

    #[test]
    fn pipelined_byte_by_byte() {
        let bytes: &[u8] = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                             3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n\
                             POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nwxyz\
                             GET /sleep/5 HTTP/1.1\r\n\r\n";
        let mut reader = RequestReader::new();
        let mut got = Vec::new();
        for &byte in bytes {
            reader.push(&[byte]);
            while let Ok(Some(request)) = reader.next_request() {
                got.push(request);
            }
        }
        let bodies: Vec<&[u8]> = got.iter().map(|r| r.body.as_slice()).collect();
        assert_eq!(bodies, [&b"abc"[..], b"wxyz", b""]);
        assert_eq!(got[2].path, "/sleep/5");
        assert!(reader.is_idle());
    }

    #[test]
    fn take_unread_gives_back_what_no_request_consumed() {
        let mut r = RequestReader::new();
        let rest = b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nab";
        r.push(b"GET / HTTP/1.1\r\n\r\n");
        r.push(rest);
        assert!(r.next_request().unwrap().is_some());
        // The second head is parsed, its body not complete.
        assert!(r.next_request().unwrap().is_none());
        assert_eq!(r.take_unread(), rest);
        assert!(r.is_idle());
        r.push(b"GET /health HTTP/1.1\r\n\r\n");
        assert_eq!(r.next_request().unwrap().unwrap().path, "/health");
    }

    #[test]
    fn is_idle_tracks_partial_requests() {
        let mut reader = RequestReader::new();
        assert!(reader.is_idle());
        reader.push(b"G");
        assert!(!reader.is_idle());
        assert_eq!(reader.next_request(), Ok(None));
        reader.push(b"ET / HTTP/1.1\r\n\r\n");
        assert!(!reader.is_idle());
        assert!(matches!(reader.next_request(), Ok(Some(_))));
        assert!(reader.is_idle());
        // A body still arriving is not idle.
        reader.push(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\na");
        assert_eq!(reader.next_request(), Ok(None));
        assert!(!reader.is_idle());
    }

    #[test]
    fn unread_bytes_resume_in_a_new_reader() {
        // A request answered, then a whole pipelined one and a chunked one
        // whose head and first chunk are parsed and whose body is still
        // arriving: what a connection moving to the next generation carries.
        let mut old = RequestReader::new();
        old.push(
            b"GET / HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n\
              POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nd",
        );
        assert_eq!(
            old.next_request().map(|r| r.map(|r| r.path)),
            Ok(Some("/".to_owned()))
        );
        let unread = old.take_unread();
        assert!(unread.starts_with(b"GET /health "), "{unread:?}");
        assert!(old.is_idle());
        assert_eq!(old.next_request(), Ok(None));
        let mut new = RequestReader::new();
        new.push(&unread);
        assert_eq!(
            new.next_request().map(|r| r.map(|r| r.path)),
            Ok(Some("/health".to_owned()))
        );
        assert_eq!(new.next_request(), Ok(None));
        // Moved again mid-body, then the rest arrives.
        let mut newer = RequestReader::new();
        newer.push(&new.take_unread());
        newer.push(b"e\r\n0\r\n\r\n");
        let echo = newer.next_request().map(|r| r.map(|r| r.body));
        assert_eq!(echo, Ok(Some(b"abcde".to_vec())));
        assert!(newer.is_idle());
    }

    #[test]
    fn idle_reader_holds_no_memory() {
        let mut reader = RequestReader::new();
        reader.push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /health HT");
        assert!(matches!(reader.next_request(), Ok(Some(_))));
        // A partial request is kept...
        assert!(!reader.is_idle());
        assert!(reader.buf.capacity() > 0);
        reader.push(b"TP/1.1\r\n\r\n");
        assert!(matches!(reader.next_request(), Ok(Some(_))));
        // ...and once nothing of a next request is left, nothing is held.
        assert!(reader.is_idle());
        assert_eq!(reader.buf.capacity(), 0);
        assert!(reader.pending.is_none());
        // The same after a body that arrived in pieces.
        reader.push(b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\na");
        assert_eq!(reader.next_request(), Ok(None));
        assert!(reader.pending.is_some());
        reader.push(b"bc");
        assert!(matches!(reader.next_request(), Ok(Some(r)) if r.body == b"abc"));
        assert_eq!(reader.buf.capacity(), 0);
        assert!(reader.pending.is_none());
    }

    /// Push `pieces` one by one, collecting requests until an error.
    fn feed(pieces: &[&[u8]]) -> (Vec<Request>, Option<u16>) {
        let mut reader = RequestReader::new();
        let mut got = Vec::new();
        for piece in pieces {
            reader.push(piece);
            loop {
                match reader.next_request() {
                    Ok(Some(request)) => got.push(request),
                    Ok(None) => break,
                    Err(status) => return (got, Some(status)),
                }
            }
        }
        (got, None)
    }

    /// Split `bytes` at the given points (taken modulo its length).
    fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        points
            .windows(2)
            .filter_map(|w| bytes.get(w[0]..w[1]))
            .collect()
    }

    /// A valid request: (path suffix, body, chunked?) -> bytes.
    fn build(path: &str, body: &[u8], chunked: bool, chunk: usize) -> Vec<u8> {
        let mut out = format!("POST /{path} HTTP/1.1\r\nHost: t\r\n").into_bytes();
        if chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for piece in body.chunks(chunk.max(1)) {
                out.extend_from_slice(format!("{:X};e=1\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\nTrailer: x\r\n\r\n");
        } else {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic_or_invent_body(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            prefix in proptest::sample::select(vec![
                &b""[..],
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n",
                b"GET / HTTP/1.1\r\n",
            ]),
            cuts in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let mut all = prefix.to_vec();
            all.extend_from_slice(&bytes);
            let (got, _) = feed(&split(&all, &cuts));
            let body_bytes: usize = got.iter().map(|r| r.body.len()).sum();
            prop_assert!(body_bytes <= all.len());
        }

        #[test]
        fn valid_requests_survive_any_split(
            requests in proptest::collection::vec(
                ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..300), any::<bool>(), 1usize..64),
                1..5,
            ),
            cuts in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let mut all = Vec::new();
            for (path, body, chunked, chunk) in &requests {
                all.extend_from_slice(&build(path, body, *chunked, *chunk));
            }
            let (got, error) = feed(&split(&all, &cuts));
            prop_assert_eq!(error, None);
            prop_assert_eq!(got.len(), requests.len());
            for (request, (path, body, _, _)) in got.iter().zip(&requests) {
                prop_assert_eq!(&request.path, &format!("/{path}"));
                prop_assert_eq!(&request.body, body);
                prop_assert!(request.keep_alive);
            }
        }
    }
}
