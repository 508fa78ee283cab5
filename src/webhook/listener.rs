//! The connection layer under both routers: accepts TCP connections, runs the TLS handshake
//! (webhook) and HTTP/1.1 (HTTP/2 only when enabled) on each, and sheds what it cannot serve
//! rather than queueing it.
//!
//! Every connection has one deadline at a time, kept by its [`Watchdog`]:
//! - the TLS handshake must finish within `--tls-handshake-timeout` of the accept;
//! - the first request head must arrive within `--request-header-timeout` of the handshake,
//!   and a later one within that time of its first byte (HTTP/1.1);
//! - with no request in flight, the connection is closed after `--idle-timeout` (longer than
//!   the 90 s a Go client such as the apiserver keeps an idle connection, so the client is the
//!   one that closes, and never races a request against our close);
//! - the body deadline (`--request-body-timeout`) is kept where the body is read
//!   ([`super::server`]), so that a slow body gets a clear 408.
//!
//! A connection late with its request head is dropped; an idle one is shut down gracefully
//! (HTTP/2: GOAWAY) and dropped [`CLOSE_GRACE`] later at most. Beyond `--max-connections` open
//! connections a new one is closed as soon as it is accepted, and every idle connection is
//! closed to make room. HTTP/2 streams and header lists are capped too.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::webhook::auth::PeerCertificates;
use tower::ServiceExt;

/// How long a connection whose deadline passed may take to shut down gracefully.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The server's limits, all flags of `serve`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Time a client has to complete the TLS handshake after connecting.
    #[arg(long, env = "CAPE_STATIC_IP_TLS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Time a client has to send a whole request head: after the handshake for the first
    /// request, after its first byte for a later one.
    #[arg(long, env = "CAPE_STATIC_IP_REQUEST_HEADER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_header_timeout: Duration,
    /// Time a client has to send a whole request body once its head arrived.
    #[arg(long, env = "CAPE_STATIC_IP_REQUEST_BODY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_body_timeout: Duration,
    /// A connection with no request in flight is closed after this long (keep it above the
    /// client's own idle timeout: 90 s for the apiserver).
    #[arg(long, env = "CAPE_STATIC_IP_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Open connections on the webhook port; beyond it a new connection is closed at once.
    #[arg(long, env = "CAPE_STATIC_IP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Reviews handled at once; beyond it a review is denied at once with code 429.
    #[arg(
        long,
        env = "CAPE_STATIC_IP_MAX_REVIEWS_IN_FLIGHT",
        default_value_t = 128
    )]
    pub max_reviews_in_flight: usize,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), in bytes.
    #[arg(long, env = "CAPE_STATIC_IP_MAX_HEADER_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,
    /// Largest request body, in bytes.
    #[arg(long, env = "CAPE_STATIC_IP_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Offer HTTP/2 (ALPN h2) besides HTTP/1.1. Off by default: over HTTP/2 an apiserver
    /// sends all its reviews over one connection, to one replica.
    #[arg(long, env = "CAPE_STATIC_IP_HTTP2", default_value_t = false)]
    pub http2: bool,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(
        long,
        env = "CAPE_STATIC_IP_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 32
    )]
    pub http2_max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tls_handshake_timeout: Duration::from_secs(5),
            request_header_timeout: Duration::from_secs(5),
            request_body_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            max_connections: 1024,
            max_reviews_in_flight: 128,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 2 * 1024 * 1024,
            http2: false,
            http2_max_concurrent_streams: 32,
        }
    }
}

/// A listening server: stops accepting and drains its connections on [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    /// `Some(drain)` once shutdown starts.
    stop: watch::Sender<Option<Duration>>,
}

impl Server {
    /// Binds `addr` and returns the server's handle, its address, and the future that serves
    /// `router` there (over TLS when `tls` is given) until [`Server::shutdown`].
    pub fn bind(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        router: Router,
        limits: Limits,
    ) -> std::io::Result<(
        Server,
        SocketAddr,
        impl Future<Output = ()> + Send + 'static,
    )> {
        // `[::]` is both families (super::listen).
        let listener = TcpListener::from_std(super::listen::bind(addr)?)?;
        let local = listener.local_addr()?;
        let (stop, stopping) = watch::channel(None);
        let accept = Accept {
            listener,
            tls: tls.map(TlsAcceptor::from),
            router,
            limits: Arc::new(limits),
        };
        Ok((Server { stop }, local, accept.run(stopping)))
    }

    /// Stops accepting; open connections finish the request in flight and close, and those
    /// still open after `drain` are dropped.
    pub fn shutdown(&self, drain: Duration) {
        let _ = self.stop.send(Some(drain));
    }
}

struct Accept {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: Arc<Limits>,
}

impl Accept {
    async fn run(self, mut stop: watch::Receiver<Option<Duration>>) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let pressure = Arc::new(Notify::new());
        let mut connections = JoinSet::new();
        let mut refused: u64 = 0;
        let mut warned: Option<Instant> = None;
        let drain = loop {
            tokio::select! {
                () = stopped(&mut stop) => break stop.borrow().unwrap_or_default(),
                Some(_) = connections.join_next() => {}
                accepted = self.listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        // A connection reset before it was accepted, or no descriptor left:
                        // keep accepting, after a short pause.
                        Err(e) => {
                            tracing::debug!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        refused += 1;
                        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            tracing::warn!(max = self.limits.max_connections, refused, "too many open connections: new ones are closed at once (--max-connections)");
                            warned = Some(Instant::now());
                        }
                        drop(tcp);
                        // Make room for the next one: idle connections are the cheapest to
                        // lose (their clients reconnect).
                        pressure.notify_waiters();
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let connection = Connection {
                        tls: self.tls.clone(),
                        router: self.router.clone(),
                        limits: self.limits.clone(),
                        pressure: pressure.clone(),
                    };
                    let stop = stop.clone();
                    connections.spawn(async move {
                        connection.serve(tcp, stop).await;
                        tracing::trace!(%peer, "connection closed");
                        drop(slot);
                    });
                }
            }
        };
        // Stop accepting. Every connection watches `stop` as well and shuts down gracefully:
        // wait for them, then drop those left.
        drop(self.listener);
        let _ = tokio::time::timeout(drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.shutdown().await;
    }
}

/// Resolves once shutdown starts; never when the [`Server`] handle was dropped (the server
/// then runs until its future is dropped).
async fn stopped(stop: &mut watch::Receiver<Option<Duration>>) {
    if stop.wait_for(Option::is_some).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What one connection needs.
struct Connection {
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: Arc<Limits>,
    /// Notified when a connection was refused for the cap: idle ones close.
    pressure: Arc<Notify>,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, mut stop: watch::Receiver<Option<Duration>>) {
        let limits = self.limits.clone();
        let Some(tls) = self.tls.clone() else {
            return self.http(tcp, false, None, stop).await;
        };
        let handshake = tokio::time::timeout(limits.tls_handshake_timeout, tls.accept(tcp));
        let stream = tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake not done within --tls-handshake-timeout");
                    return;
                }
            },
            () = stopped(&mut stop) => return,
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        // The client certificate, if any, for the caller check of every request.
        let peer = PeerCertificates::of(stream.get_ref().1);
        self.http(stream, h2 && limits.http2, peer, stop).await;
    }

    /// Serves HTTP on an established stream until a deadline passes, the client closes, or
    /// the server shuts down.
    async fn http<T>(
        self,
        io: T,
        h2: bool,
        peer: Option<PeerCertificates>,
        stop: watch::Receiver<Option<Duration>>,
    ) where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &self.limits;
        let dog = Arc::new(Watchdog::new(
            limits.request_header_timeout,
            limits.idle_timeout,
            self.pressure.clone(),
        ));
        // Over HTTP/1.1 any byte while idle starts a request head; over HTTP/2 it may be a
        // PING or a window update.
        let io = TokioIo::new(Watched {
            inner: io,
            dog: (!h2).then(|| dog.clone()),
        });
        let router = self.router;
        let service = {
            let dog = dog.clone();
            hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                if let Some(peer) = &peer {
                    request.extensions_mut().insert(peer.clone());
                }
                let busy = dog.begin();
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await;
                    drop(busy);
                    response
                }
            })
        };
        if h2 {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.http2_max_concurrent_streams)
                .max_header_list_size(limits.max_header_bytes)
                .max_pending_accept_reset_streams(20)
                .max_local_error_reset_streams(1024);
            drive(builder.serve_connection(io, service), &dog, stop).await;
        } else {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                // The watchdog keeps the head deadline, apart from the idle one.
                .header_read_timeout(None)
                .max_buf_size(limits.max_header_bytes as usize);
            drive(builder.serve_connection(io, service), &dog, stop).await;
        }
    }
}

/// Polls `conn` until it ends. When the server stops or the connection has been idle too
/// long, shuts it down gracefully (HTTP/2: GOAWAY) and drops it [`CLOSE_GRACE`] later at most
/// (at shutdown the server's drain time bounds it instead); a late request head is dropped at
/// once.
async fn drive<C>(conn: C, dog: &Watchdog, mut stop: watch::Receiver<Option<Duration>>)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = pin!(conn);
    let grace = tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        late = dog.expired() => {
            tracing::debug!(reason = late.reason(), "closing the connection");
            match late {
                Late::Head => return,
                Late::Idle => CLOSE_GRACE,
            }
        }
        () = stopped(&mut stop) => Duration::MAX,
    };
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, conn).await;
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Late {
    Head,
    Idle,
}

impl Late {
    fn reason(self) -> &'static str {
        match self {
            Late::Head => "request head not received within --request-header-timeout",
            Late::Idle => "idle for --idle-timeout",
        }
    }
}

/// One connection's deadline: the request head, or idle time, whichever phase it is in. No
/// deadline while a request is in flight (the body deadline is kept where it is read).
struct Watchdog {
    state: Mutex<Phase>,
    changed: Notify,
    /// See [`Connection::pressure`].
    pressure: Arc<Notify>,
    head: Duration,
    idle: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head to complete, by the deadline.
    Head(Instant),
    /// No request in flight and none started, until the deadline.
    Idle(Instant),
    /// This many requests in flight.
    Busy(usize),
}

/// Marks a request in flight while it lives.
struct Busy(Arc<Watchdog>);

impl Drop for Busy {
    fn drop(&mut self) {
        let dog = &self.0;
        let mut state = dog.lock();
        *state = match *state {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now() + dog.idle),
        };
        drop(state);
        dog.changed.notify_one();
    }
}

impl Watchdog {
    /// A connection just established: its first request head is due.
    fn new(head: Duration, idle: Duration, pressure: Arc<Notify>) -> Self {
        Watchdog {
            state: Mutex::new(Phase::Head(Instant::now() + head)),
            changed: Notify::new(),
            pressure,
            head,
            idle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: when idle, they start a request head.
    fn bytes(&self) {
        let mut state = self.lock();
        if let Phase::Idle(idle) = *state {
            *state = Phase::Head(idle.min(Instant::now() + self.head));
            drop(state);
            self.changed.notify_one();
        }
    }

    /// A request head is complete.
    fn begin(self: &Arc<Self>) -> Busy {
        let mut state = self.lock();
        *state = match *state {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
        drop(state);
        self.changed.notify_one();
        Busy(self.clone())
    }

    /// Resolves when the deadline of the current phase passes, with what was late.
    async fn expired(&self) -> Late {
        loop {
            let changed = self.changed.notified();
            let deadline = match *self.lock() {
                Phase::Head(t) => Some((t, Late::Head)),
                Phase::Idle(t) => Some((t, Late::Idle)),
                Phase::Busy(_) => None,
            };
            match deadline {
                Some((t, late)) if t <= Instant::now() => return late,
                Some((t, late)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = changed => {}
                        _ = self.pressure.notified(), if late == Late::Idle => return late,
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A stream that tells the watchdog when bytes arrive.
struct Watched<T> {
    inner: T,
    dog: Option<Arc<Watchdog>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(dog)) = (&polled, &self.dog)
            && buf.filled().len() > before
        {
            dog.bytes();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        limits: Limits,
    }

    #[test]
    fn defaults_match_the_flags() {
        assert_eq!(Flags::parse_from(["serve"]).limits, Limits::default());
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_phases() {
        let dog = Arc::new(Watchdog::new(
            Duration::from_secs(5),
            Duration::from_secs(120),
            Default::default(),
        ));
        let start = Instant::now();
        assert_eq!(dog.expired().await, Late::Head);
        assert_eq!(start.elapsed(), Duration::from_secs(5));

        let dog = Arc::new(Watchdog::new(
            Duration::from_secs(5),
            Duration::from_secs(120),
            Default::default(),
        ));
        let busy = dog.begin();
        // No deadline while busy.
        assert!(
            tokio::time::timeout(Duration::from_secs(600), dog.expired())
                .await
                .is_err()
        );
        drop(busy);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(60)).await;
        // A byte while idle starts the head deadline.
        dog.bytes();
        assert_eq!(dog.expired().await, Late::Head);
        assert_eq!(start.elapsed(), Duration::from_secs(65));

        let dog = Arc::new(Watchdog::new(
            Duration::from_secs(5),
            Duration::from_secs(120),
            Default::default(),
        ));
        drop(dog.begin());
        let start = Instant::now();
        assert_eq!(dog.expired().await, Late::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(120));

        // Under pressure an idle connection goes at once; a busy one or one sending its head
        // does not.
        let pressure = Arc::new(Notify::new());
        let dog = Arc::new(Watchdog::new(
            Duration::from_secs(5),
            Duration::from_secs(120),
            pressure.clone(),
        ));
        let start = Instant::now();
        let waiting = tokio::spawn({
            let dog = dog.clone();
            async move { dog.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        pressure.notify_waiters();
        assert_eq!(waiting.await.unwrap(), Late::Head);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(dog.begin());
        let start = Instant::now();
        let waiting = tokio::spawn({
            let dog = dog.clone();
            async move { dog.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        pressure.notify_waiters();
        assert_eq!(waiting.await.unwrap(), Late::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
