//! A small HTTP/1.1 JSON client over TCP (feature `client`): how the tiers call each other (root → cluster,
//! cluster → root, worker → cluster). Plain HTTP, one connection per call, a deadline on the whole exchange.
//!
//! It is deliberately tiny (hyper's client connection, no pool, no TLS): calls between tiers are rare (seconds
//! apart), and a fresh connection per call never trips over a half-closed idle socket.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request,
    body::Bytes,
    header::{AUTHORIZATION, CONTENT_TYPE, HOST},
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;

/// Largest answer body read.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://host[:port]/path`.
    #[error("invalid URL {url:?}: {rule}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        rule: &'static str,
    },
    /// Connecting, sending or receiving failed.
    #[error("{method} {url}: {reason}")]
    Transport {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// No complete answer within the deadline.
    #[error("{method} {url}: no answer within {timeout:?}")]
    Timeout {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The request body could not be serialised.
    #[error("cannot serialise the request body: {0}")]
    Encode(#[from] serde_json::Error),
}

/// An answer: the status and the body (parsed as JSON when it is JSON, else kept as a string value).
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body: JSON, or the raw text as `Value::String`, or `Value::Null` when empty.
    pub body: Value,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// `http://host[:port]` split into its parts (`host` keeps IPv6 brackets for the `Host` header).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    authority: String,
    connect: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, ClientError> {
    let bad = |rule| ClientError::Url {
        url: url.to_owned(),
        rule,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad("the host is missing"));
    }
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.contains(':')
    };
    let connect = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(Target {
        authority: authority.to_owned(),
        connect,
        path: path.to_owned(),
    })
}

/// Formats `http://<host>:<port>` with IPv6 hosts bracketed.
pub fn base_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

/// Sends one request with an optional JSON body and bearer token and reads the whole answer within `timeout`.
pub async fn call<B: Serialize + ?Sized>(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<&B>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let target = parse_url(url)?;
    let payload = encode(body)?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&target.connect)
            .await
            .map_err(|e| transport(&method, url, format!("connect: {e}")))?;
        exchange(
            stream,
            method.clone(),
            url,
            &target,
            bearer,
            body.is_some(),
            payload,
        )
        .await
    };
    deadline(exchange, &method, url, timeout).await
}

/// Sends one request to an HTTP server on the unix socket `socket` (how the NodeEngine calls its NetManager):
/// `path` is the request path, e.g. `/container/deploy`.
#[cfg(unix)]
pub async fn call_unix<B: Serialize + ?Sized>(
    method: Method,
    socket: &std::path::Path,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let url = format!("unix:{}:{path}", socket.display());
    let target = Target {
        authority: "localhost".to_owned(),
        connect: socket.display().to_string(),
        path: path.to_owned(),
    };
    let payload = encode(body)?;
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| transport(&method, &url, format!("connect: {e}")))?;
        exchange(
            stream,
            method.clone(),
            &url,
            &target,
            None,
            body.is_some(),
            payload,
        )
        .await
    };
    deadline(exchange, &method, &url, timeout).await
}

fn encode<B: Serialize + ?Sized>(body: Option<&B>) -> Result<Bytes, ClientError> {
    Ok(match body {
        Some(b) => Bytes::from(serde_json::to_vec(b)?),
        None => Bytes::new(),
    })
}

fn transport(method: &Method, url: &str, reason: String) -> ClientError {
    ClientError::Transport {
        method: method.clone(),
        url: url.to_owned(),
        reason,
    }
}

async fn deadline(
    exchange: impl std::future::Future<Output = Result<Response, ClientError>>,
    method: &Method,
    url: &str,
    timeout: Duration,
) -> Result<Response, ClientError> {
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            method: method.clone(),
            url: url.to_owned(),
            timeout,
        }),
    }
}

async fn exchange<S>(
    stream: S,
    method: Method,
    url: &str,
    target: &Target,
    bearer: Option<&str>,
    has_body: bool,
    payload: Bytes,
) -> Result<Response, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let transport = |reason: String| transport(&method, url, reason);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transport(format!("handshake: {e}")))?;
    // The connection future drives the socket; it ends when the exchange is over or the peer hangs up.
    // Its error after the answer was read (e.g. the peer closing first) is of no interest to the caller.
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(target.path.as_str())
        .header(HOST, target.authority.as_str());
    if has_body {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    if let Some(token) = bearer {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder
        .body(Full::new(payload))
        .map_err(|e| transport(format!("request: {e}")))?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| transport(format!("send: {e}")))?;
    let status = answer.status().as_u16();
    let limited = http_body_util::Limited::new(answer.into_body(), MAX_RESPONSE_BYTES);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| transport(format!("body: {e}")))?
        .to_bytes();
    driver.abort();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_port() {
        let t = parse_url("http://10.0.0.1:10100/api/x").unwrap();
        assert_eq!(
            (t.connect.as_str(), t.path.as_str()),
            ("10.0.0.1:10100", "/api/x")
        );
        let t = parse_url("http://host").unwrap();
        assert_eq!((t.connect.as_str(), t.path.as_str()), ("host:80", "/"));
        let t = parse_url("http://[::1]:8/p").unwrap();
        assert_eq!(t.connect, "[::1]:8");
        let t = parse_url("http://[::1]/p").unwrap();
        assert_eq!(t.connect, "[::1]:80");
        assert!(matches!(parse_url("https://x/"), Err(ClientError::Url { .. })));
        assert!(matches!(parse_url("http:///x"), Err(ClientError::Url { .. })));
    }

    #[test]
    fn base_urls_bracket_ipv6() {
        assert_eq!(base_url("::1", 10), "http://[::1]:10");
        assert_eq!(base_url("10.0.0.1", 10), "http://10.0.0.1:10");
    }

    #[tokio::test]
    async fn calls_a_real_socket_and_reads_json() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0_u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("{\"a\":1}") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 7\r\n\r\n{\"b\":2}")
                .await
                .unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        let url = format!("http://{addr}/api/x");
        let r = call(
            Method::POST,
            &url,
            Some("tok"),
            Some(&serde_json::json!({"a": 1})),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, serde_json::json!({"b": 2}));
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /api/x HTTP/1.1"), "{request}");
        assert!(
            request.to_ascii_lowercase().contains("authorization: bearer tok"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn calls_a_unix_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("oakestra-client-unix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0_u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("{\"pid\":7}") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"nsAddress\":\"x\"}")
                .await
                .unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        let r = call_unix(
            Method::POST,
            &socket,
            "/container/deploy",
            Some(&serde_json::json!({"pid": 7})),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!((r.status, r.body["nsAddress"].as_str()), (200, Some("x")));
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /container/deploy HTTP/1.1"),
            "{request}"
        );
        let missing = call_unix::<()>(
            Method::POST,
            &dir.join("none.sock"),
            "/x",
            None,
            Duration::from_secs(2),
        )
        .await;
        assert!(
            matches!(&missing, Err(ClientError::Transport { url, .. }) if url.contains("none.sock")),
            "{missing:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn refused_and_silent_peers_are_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}/");
        let err = call::<()>(Method::GET, &url, None, None, Duration::from_millis(200)).await;
        assert!(matches!(err, Err(ClientError::Timeout { .. })), "{err:?}");
        drop(listener);
        let err = call::<()>(Method::GET, &url, None, None, Duration::from_secs(2)).await;
        assert!(matches!(err, Err(ClientError::Transport { .. })), "{err:?}");
    }
}
