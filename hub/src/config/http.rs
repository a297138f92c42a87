//! The hub's `[http]` settings: where the API listens and what it allows its clients.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub request_body_bytes_max: usize,
    /// Connections served at once; more wait to be accepted.
    pub connections_max: u64,
    /// How long a request's headers may take to arrive, a body may stall, or a keep-alive
    /// connection may sit idle.
    pub header_read_timeout_ms: u64,
    /// How long a request may take until its answer starts.
    pub request_timeout_ms: u64,
    /// Connections one client address may hold at once; more from it are closed on accept.
    pub connections_per_address_max: u64,
    /// Live event streams (`GET .../events`) open at once, in all and per token; past either
    /// a new stream is answered 429 `too_many_streams`.
    pub event_streams_max: u64,
    pub event_streams_per_token_max: u64,
}

impl HttpConfig {
    /// The valid ranges of the limits, for the config check.
    pub fn ranges(&self) -> impl Iterator<Item = (&'static str, u64, u64, u64)> {
        larder_agent::http_server::ServerLimits::config_ranges(
            self.connections_max,
            self.header_read_timeout_ms,
            self.request_timeout_ms,
        )
        .into_iter()
        .chain([
            (
                "http.connections_per_address_max",
                self.connections_per_address_max,
                1,
                1_000_000,
            ),
            ("http.event_streams_max", self.event_streams_max, 1, 100_000),
            (
                "http.event_streams_per_token_max",
                self.event_streams_per_token_max,
                1,
                100_000,
            ),
        ])
    }

    pub fn server_limits(&self) -> larder_agent::http_server::ServerLimits {
        let mut limits = larder_agent::http_server::ServerLimits::from_config(
            self.connections_max,
            self.header_read_timeout_ms,
            self.request_timeout_ms,
        );
        limits.connections_per_address_max =
            usize::try_from(self.connections_per_address_max).unwrap_or(usize::MAX);
        limits
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            request_body_bytes_max: 1024 * 1024,
            connections_max: 1_024,
            header_read_timeout_ms: 30_000,
            request_timeout_ms: 60_000,
            connections_per_address_max: 64,
            event_streams_max: 256,
            event_streams_per_token_max: 8,
        }
    }
}
