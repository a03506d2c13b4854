//! The HTTP/1.1 server every oakestra-rs API listener runs (feature `server`): [`serve`] an axum [`Router`] with
//! the [`ServerLimits`] a listener open to the network needs, and [`json_errors`], the layer that turns every
//! error answer into a JSON `{"message": …}`.
//!
//! # Timeouts
//!
//! hyper's own `header_read_timeout` starts whenever a connection waits for a request head, idle keep-alive
//! connections included, so it cannot give a short header deadline *and* a longer keep-alive. Each connection here
//! keeps its own clock instead ([`Clock`]), fed by the socket's reads and by the requests the service sees:
//!
//! - **header read**: a request head must be complete within [`ServerLimits::header_read_timeout`] of its first
//!   byte (and the first request within that time of the accept), however slowly the bytes trickle in;
//! - **idle**: a keep-alive connection with no request in flight and nothing received is closed after
//!   [`ServerLimits::idle_timeout`].
//!
//! - **body read**: a request body must be complete within [`ServerLimits::body_read_timeout`] of the end of its
//!   head; a client that trickles it in slower gets a 400 naming the limit and the connection is closed (the
//!   handler sees its body fail, as for any broken body).
//!
//! A request in flight (its handler running) is otherwise never cut; the handlers' own deadlines bound it.
//!
//! # Connections and shutdown
//!
//! At most [`ServerLimits::max_connections`] connections are served at once; beyond that the listener stops
//! accepting (new clients wait in the kernel's backlog) until one closes. When `shutdown` completes the listener is
//! closed, idle connections are closed at once, and [`serve`] returns once the requests in flight are answered.
//!
//! Handlers get the peer address as `axum::extract::ConnectInfo<SocketAddr>`: the TCP peer, never a header.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    http::{HeaderMap, HeaderValue, Request, Response, header},
};
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
    time::Instant,
};

/// Default [`ServerLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServerLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`ServerLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default [`ServerLimits::body_read_timeout`].
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// How long a request head (request line and headers) may take from its first byte, and the first request
    /// from the accept. A client that trickles its head in slower is disconnected.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight and nothing received.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// How long a request body may take to arrive, from the end of its head.
    pub body_read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener` with `limits` until `shutdown` completes, then lets the requests in flight finish
/// and returns.
///
/// Accept errors (a peer that reset before the accept, too many open files) are logged and retried, never fatal.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached: new connections wait until one closes"
                );
                tokio::select! {
                    () = &mut shutdown => break,
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break, // never closed
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE and the like: give the process a moment to close something.
                    tracing::warn!(error = %e, "accept failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            stream,
            peer,
            router.clone(),
            limits,
            stop_rx.clone(),
            permit,
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, times out, or (after `stop`) has answered what it was asked.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let clock = Arc::new(Clock::new(Instant::now()));
    let io = TokioIo::new(Watched {
        inner: stream,
        clock: Arc::clone(&clock),
    });
    let routed = TowerToHyperService::new(router);
    let service = {
        let clock = Arc::clone(&clock);
        let body_read_timeout = limits.body_read_timeout;
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(ConnectInfo(peer));
            let body = Body::new(BodyDeadline {
                inner: body,
                limit: body_read_timeout,
                due: Instant::now() + body_read_timeout,
                timer: None,
            });
            let in_flight = InFlight::start(Arc::clone(&clock));
            let answer = hyper::service::Service::call(&routed, Request::from_parts(parts, body));
            async move {
                let response = answer.await;
                drop(in_flight);
                response
            }
        })
    };
    // No hyper timer: its header timeout would also cut idle keep-alive connections (see the module docs).
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = clock.deadline(&limits);
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = clock.changed.notified() => {}
            () = sleep_until(deadline.map(|(at, _)| at)) => {
                if let Some((at, why)) = clock.deadline(&limits)
                    && at <= Instant::now()
                {
                    tracing::debug!(%peer, reason = why, "closing the connection");
                    return;
                }
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// A request body that must be complete by `due` (the end of its head plus the body read timeout).
struct BodyDeadline {
    inner: Incoming,
    limit: Duration,
    due: Instant,
    /// Armed the first time the body is not ready: a request without a body never sets a timer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::body::Body for BodyDeadline {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let due = this.due;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.as_mut().poll(cx).is_ready() {
            let why = format!(
                "the request body did not arrive within {} s (the body read timeout)",
                this.limit.as_secs_f64()
            );
            return Poll::Ready(Some(Err(why.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One connection's view of time: what it is waiting for and since when.
#[derive(Debug)]
struct Clock {
    state: Mutex<ClockState>,
    /// Woken when the deadline may have moved earlier or gone (a head started, a request ended).
    changed: Notify,
}

#[derive(Debug)]
struct ClockState {
    /// Requests handed to the service and not answered yet.
    in_flight: usize,
    /// When the connection last had nothing in flight: the accept, or the end of the last request.
    idle_since: Instant,
    /// When the head of the next request started (its first byte, or the accept for the first request).
    head_since: Option<Instant>,
}

impl Clock {
    fn new(accepted: Instant) -> Self {
        Self {
            state: Mutex::new(ClockState {
                in_flight: 0,
                idle_since: accepted,
                head_since: Some(accepted),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        // The state is a few plain fields, each update complete: a poisoned lock holds nothing half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the connection is due to be closed, and why; `None` while a request is in flight.
    fn deadline(&self, limits: &ServerLimits) -> Option<(Instant, &'static str)> {
        let state = self.lock();
        if state.in_flight > 0 {
            return None;
        }
        Some(match state.head_since {
            Some(since) => (since + limits.header_read_timeout, "header read timeout"),
            None => (state.idle_since + limits.idle_timeout, "idle timeout"),
        })
    }

    /// Bytes arrived: between requests they start the next head.
    fn received(&self) {
        let mut state = self.lock();
        if state.in_flight == 0 && state.head_since.is_none() {
            state.head_since = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }
}

/// A request in flight on a connection; its end (answered or cancelled) makes the connection idle again.
struct InFlight(Arc<Clock>);

impl InFlight {
    fn start(clock: Arc<Clock>) -> Self {
        {
            let mut state = clock.lock();
            state.in_flight += 1;
            state.head_since = None;
        }
        clock.changed.notify_one();
        Self(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut state = self.0.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
            if state.in_flight == 0 {
                state.idle_since = Instant::now();
            }
        }
        self.0.changed.notify_one();
    }
}

/// The socket, telling the connection's [`Clock`] when bytes arrive.
struct Watched {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Largest error body [`json_errors`] reads to quote it; a longer one is replaced by the status's reason.
const MAX_QUOTED_ERROR: usize = 16 * 1024;

/// Makes every error answer (4xx, 5xx) a JSON `{"message": …}`: a body that is not JSON (axum's plain-text
/// rejections: a path segment that is not UTF-8, a bad query string, 405 Method Not Allowed, 413, …) becomes the
/// message, an empty one the status's reason ("Method Not Allowed"). The status and the other headers (`Allow`,
/// `Retry-After`, …) are kept; JSON answers and successes pass unchanged.
///
/// Use it as the router's outermost layer: `router.layer(axum::middleware::map_response(json_errors))`.
pub async fn json_errors(response: Response<Body>) -> Response<Body> {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_QUOTED_ERROR)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let body = json!({ "message": message }).to_string();
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// Whether the answer says it is JSON (`application/json`, or any `…+json`).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
        .is_some_and(|mime| mime == "application/json" || mime.ends_with("+json"))
}

/// The token of a request's `Authorization: Bearer <token>` header, if it has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    oakestra_protocol::bearer::token(value)
}

#[cfg(test)]
mod tests {
    use axum::{http::StatusCode, response::IntoResponse, routing::get};
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A request in flight when the shutdown comes is answered; then `serve` returns and the port is closed.
    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish() {
        let router = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, ServerLimits::default(), async {
            let _ = stopped.await;
        }));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(()).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
    }

    /// A body trickled in slower than the body read timeout is answered 400 naming the limit, and the connection
    /// is closed; a body in time is read.
    #[tokio::test]
    async fn slow_bodies_are_cut() {
        let router = Router::new().route(
            "/echo",
            axum::routing::post(|body: axum::body::Bytes| async move { format!("got {}", body.len()) }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits {
            body_read_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        };
        let server = tokio::spawn(serve(
            listener,
            router.layer(axum::middleware::map_response(json_errors)),
            limits,
            std::future::pending(),
        ));
        let head = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n";
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(format!("{head}12345").as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_string(&mut answer))
            .await
            .expect("the connection is closed")
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("body read timeout"), "{answer}");
        assert!(answer.contains("\"message\""), "{answer}");

        let mut quick = TcpStream::connect(addr).await.unwrap();
        quick
            .write_all(format!("{head}1234567890").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let n = quick.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("got 10"),
            "{answer}"
        );
        server.abort();
    }

    async fn body_json(response: Response<Body>) -> Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn text_errors_become_json_keeping_status_and_headers() {
        let text = (
            StatusCode::BAD_REQUEST,
            [(header::RETRY_AFTER, "3")],
            "Invalid URL: bad percent-encoding",
        )
            .into_response();
        let out = json_errors(text).await;
        assert_eq!(out.status(), StatusCode::BAD_REQUEST);
        assert_eq!(out.headers()[header::RETRY_AFTER], "3");
        assert_eq!(out.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            body_json(out).await,
            json!({"message": "Invalid URL: bad percent-encoding"})
        );
    }

    #[tokio::test]
    async fn empty_errors_get_the_reason() {
        let empty = (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "GET,HEAD")]).into_response();
        let out = json_errors(empty).await;
        assert_eq!(out.headers()[header::ALLOW], "GET,HEAD");
        assert_eq!(body_json(out).await, json!({"message": "Method Not Allowed"}));
    }

    #[tokio::test]
    async fn json_and_successes_pass_unchanged() {
        let json_error = (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            r#"{"message":"x","extra":1}"#,
        )
            .into_response();
        assert_eq!(
            body_json(json_errors(json_error).await).await,
            json!({"message": "x", "extra": 1})
        );
        let ok = (StatusCode::OK, "plain text").into_response();
        let out = json_errors(ok).await;
        assert_eq!(out.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    }
}
