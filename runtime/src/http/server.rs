//! The HTTP server loop of the agent and the hub: an axum router served over HTTP/1.1 with a
//! cap on open connections and a time limit on reading a request's headers.
//!
//! `axum::serve` has neither: a client that opens connections and never finishes a request
//! (or leaves them idle) holds a task and a socket each, for as long as it likes. Here a
//! connection past `connections_max` waits in the listen backlog until one closes, and hyper
//! closes a connection whose next request's headers are not complete within
//! `header_read_timeout`, which bounds idle keep-alive connections too. A request body that
//! stalls for as long is cut off as well (`RequestBodyTimeoutLayer`), and a request not
//! answered within `request_timeout` (a body sent a byte at a time, a handler stuck) is
//! answered 408 `timeout`; a streamed answer (the hub's live events) is not cut, as its
//! headers come at once. One address holds at most `connections_per_address_max` of the
//! places (more from it are closed at once), and a connection whose answer nobody reads for
//! `header_read_timeout` (its writes stalled: a stream that is never read) is dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What a server allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; more wait to be accepted.
    pub connections_max: usize,
    /// Connections one client address may hold at once; more from it are closed on accept.
    pub connections_per_address_max: usize,
    /// How long a request's headers (or a request body between two chunks) may take to
    /// arrive, and how long a keep-alive connection may sit idle.
    pub header_read_timeout: Duration,
    /// How long a request may take from its headers to its answer's headers.
    pub request_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the connections open
/// at that moment to finish their requests, for at most `header_read_timeout`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let deadline = limits.request_timeout;
    let app = app
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.header_read_timeout,
        ))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                match tokio::time::timeout(deadline, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => super::ApiError::new(
                        axum::http::StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!(
                            "the request was not answered within {} ms",
                            deadline.as_millis()
                        ),
                    )
                    .into_response(),
                }
            },
        ));
    let permits = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    let per_address = Places::new(limits.connections_per_address_max, usize::MAX);
    let graceful = GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer.ip()),
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: retrying at once would spin, as
                    // the error stays until some connection closes.
                    tracing::error!(error = %e, "HTTP accept failed; retrying in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = per_address.take(client_of(peer)) else {
            tracing::debug!(%peer, "HTTP connection closed: its address holds its share of places");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let io = TokioIo::new(WriteStallLimit::new(stream, limits.header_read_timeout));
        let connection = graceful.watch(http1.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
            drop((permit, slot));
        });
    }
    drop(listener);
    // Requests under way get as long to finish as a request's headers get to arrive; a client
    // that holds its connection past that (one that never reads its answer) is left behind.
    if tokio::time::timeout(limits.header_read_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open at shutdown were left");
    }
}

/// The client an address stands for: an IPv4 address, or an IPv6 address's /64 (one host
/// commonly holds a whole /64, so counting its addresses one by one would count nothing).
fn client_of(peer: std::net::IpAddr) -> std::net::IpAddr {
    match peer {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        },
        v4 => v4,
    }
}

/// Places held per key (a client address, a bearer token), at most `per_key_max` for one key
/// and `max` in all. A place is a guard: dropping it gives it back. The HTTP server counts
/// connections per client address with it, the hub live event streams per token.
#[derive(Debug)]
pub struct Places<K> {
    held: std::sync::Mutex<std::collections::HashMap<K, usize>>,
    per_key_max: usize,
    max: usize,
}

/// How many places were held when one more was refused: by the key, and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacesFull {
    pub of_key: usize,
    pub all: usize,
}

impl<K: std::hash::Hash + Eq + Clone> Places<K> {
    pub fn new(per_key_max: usize, max: usize) -> Arc<Self> {
        Arc::new(Self {
            held: std::sync::Mutex::default(),
            per_key_max,
            max,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<K, usize>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for `key`, unless the key or everyone holds as many as allowed.
    pub fn take(self: &Arc<Self>, key: K) -> Result<Place<K>, PlacesFull> {
        let mut held = self.lock();
        let of_key = held.get(&key).copied().unwrap_or(0);
        let all = held.values().sum();
        if of_key >= self.per_key_max || all >= self.max {
            return Err(PlacesFull { of_key, all });
        }
        *held.entry(key.clone()).or_default() += 1;
        Ok(Place {
            places: self.clone(),
            key,
        })
    }
}

/// One place taken from [`Places`]; given back when dropped.
#[derive(Debug)]
pub struct Place<K: std::hash::Hash + Eq + Clone> {
    places: Arc<Places<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        let mut held = self.places.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// A connection whose writes may stall no longer than `limit`: a client that stops reading
/// (a live event stream left open, an answer never taken) gets a `TimedOut` error, which ends
/// the connection, instead of holding its place for good.
struct WriteStallLimit<S> {
    inner: S,
    limit: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStallLimit<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// A write's outcome: progress disarms the deadline; a write that could not go on arms
    /// it (it wakes the task) and fails once it has passed.
    fn after<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if polled.is_pending() {
            return self.pending(cx);
        }
        self.stalled = None;
        polled
    }

    /// After a write that could not go on: arm the deadline (it wakes the task), and fail
    /// once it has passed.
    fn pending<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {} ms", limit.as_millis()),
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStallLimit<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStallLimit<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after(cx, polled)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.after(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Errors that end one incoming connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A peer that stops reading: writes fill its pipe, and after the limit the next write
    /// fails instead of waiting for ever; a peer that reads keeps the connection going.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_stalls_past_the_limit_fails() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut conn = WriteStallLimit::new(ours, Duration::from_secs(30));
        conn.write_all(&[1; 64]).await.expect("fits the pipe");
        // Read a little: the next write goes through.
        let mut buf = [0u8; 16];
        theirs.read_exact(&mut buf).await.expect("read");
        conn.write_all(&[2; 16]).await.expect("room again");
        // Then nothing is read: the write waits, then fails after the limit (paused time
        // jumps to the deadline).
        let started = tokio::time::Instant::now();
        let err = conn.write_all(&[3; 64]).await.expect_err("stalled");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(30));
    }

    #[test]
    fn an_address_holds_at_most_its_share() {
        let places = Places::new(2, 3);
        let a: std::net::IpAddr = [127, 0, 0, 1].into();
        let b: std::net::IpAddr = [127, 0, 0, 2].into();
        let first = places.take(a).expect("first");
        let second = places.take(a).expect("second");
        assert_eq!(places.take(a).err(), Some(PlacesFull { of_key: 2, all: 2 }));
        let other = places.take(b).expect("b has its own share");
        assert_eq!(
            places.take(b).err(),
            Some(PlacesFull { of_key: 1, all: 3 }),
            "all places taken"
        );
        drop(first);
        let again = places.take(a).expect("a place freed");
        drop((second, again, other));
        assert!(places.lock().is_empty(), "all given back");
        let v6 = |s: &str| client_of(s.parse().expect("address"));
        assert_eq!(
            v6("2001:db8::1"),
            v6("2001:db8::ffff:1"),
            "one /64, one client"
        );
        assert_ne!(v6("2001:db8::1"), v6("2001:db8:0:1::1"));
        assert_eq!(v6("::ffff:10.0.0.1"), v6("10.0.0.1"));
    }
}
