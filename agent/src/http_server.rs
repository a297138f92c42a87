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
//! headers come at once.

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
    /// How long a request's headers (or a request body between two chunks) may take to
    /// arrive, and how long a keep-alive connection may sit idle.
    pub header_read_timeout: Duration,
    /// How long a request may take from its headers to its answer's headers.
    pub request_timeout: Duration,
}

impl ServerLimits {
    /// The `[http]` config's limits with their valid ranges, as `(key, value, min, max)`, for
    /// the agent's and the hub's config checks.
    pub fn config_ranges(
        connections_max: u64,
        header_read_timeout_ms: u64,
        request_timeout_ms: u64,
    ) -> [(&'static str, u64, u64, u64); 3] {
        [
            ("http.connections_max", connections_max, 1, 1_000_000),
            (
                "http.header_read_timeout_ms",
                header_read_timeout_ms,
                100,
                3_600_000,
            ),
            (
                "http.request_timeout_ms",
                request_timeout_ms,
                100,
                3_600_000,
            ),
        ]
    }

    /// The limits as the agent's and the hub's `[http]` config give them.
    pub fn from_config(
        connections_max: u64,
        header_read_timeout_ms: u64,
        request_timeout_ms: u64,
    ) -> Self {
        Self {
            connections_max: usize::try_from(connections_max).unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_millis(header_read_timeout_ms),
            request_timeout: Duration::from_millis(request_timeout_ms),
        }
    }
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
                    Err(_) => crate::api::ApiError::new(
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
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http1.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
            drop(permit);
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

/// Errors that end one incoming connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
