//! The `[http]` settings of the agent's and the hub's configs: one struct, each deployable
//! with its own defaults ([`HttpDefaults`]).

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::ServerLimits;

/// A deployable's defaults for its `[http]` settings.
pub trait HttpDefaults {
    const LISTEN: SocketAddr;
    const CONNECTIONS_MAX: u64;
    /// Connections one client address may hold; `None`: as many as `connections_max` (a
    /// deployable whose clients all share one address).
    const CONNECTIONS_PER_ADDRESS_MAX: Option<u64>;
    /// Live event streams in all and per token, for a deployable that serves them; `None`
    /// for one that serves none (then setting them is a config problem).
    const EVENT_STREAMS: Option<(u64, u64)>;
}

/// `[http]`: where the API listens and what it allows its clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, bound(deserialize = "D: HttpDefaults"))]
pub struct HttpConfig<D> {
    pub listen: SocketAddr,
    pub request_body_bytes_max: usize,
    /// Connections served at once; more wait to be accepted.
    pub connections_max: u64,
    /// Connections one client address may hold at once; more from it are closed on accept.
    /// Unset: the deployable's default ([`HttpConfig::connections_per_address`]).
    pub connections_per_address_max: Option<u64>,
    /// How long a request's headers may take to arrive, a body may stall, or a keep-alive
    /// connection may sit idle.
    pub header_read_timeout_ms: u64,
    /// How long a request may take until its answer starts.
    pub request_timeout_ms: u64,
    /// Live event streams (`GET .../events`) open at once, in all and per token; past either
    /// a new stream is answered 429 `too_many_streams`. Only a deployable that serves them
    /// takes these.
    pub event_streams_max: Option<u64>,
    pub event_streams_per_token_max: Option<u64>,
    /// Whose defaults these are (public so that `..Default::default()` can fill it).
    #[serde(skip)]
    pub defaults: PhantomData<D>,
}

impl<D: HttpDefaults> Default for HttpConfig<D> {
    fn default() -> Self {
        Self {
            listen: D::LISTEN,
            request_body_bytes_max: 1024 * 1024,
            connections_max: D::CONNECTIONS_MAX,
            connections_per_address_max: None,
            header_read_timeout_ms: 30_000,
            request_timeout_ms: 60_000,
            event_streams_max: None,
            event_streams_per_token_max: None,
            defaults: PhantomData,
        }
    }
}

impl<D: HttpDefaults> HttpConfig<D> {
    /// The limits with their valid ranges, as `(key, value, min, max)`, for the config check.
    pub fn ranges(&self) -> Vec<(&'static str, u64, u64, u64)> {
        let mut ranges = vec![
            ("http.connections_max", self.connections_max, 1, 1_000_000),
            (
                "http.connections_per_address_max",
                self.connections_per_address(),
                1,
                1_000_000,
            ),
            (
                "http.header_read_timeout_ms",
                self.header_read_timeout_ms,
                100,
                3_600_000,
            ),
            (
                "http.request_timeout_ms",
                self.request_timeout_ms,
                100,
                3_600_000,
            ),
        ];
        if D::EVENT_STREAMS.is_some() {
            let (all, per_token) = self.event_streams();
            ranges.push(("http.event_streams_max", all, 1, 100_000));
            ranges.push(("http.event_streams_per_token_max", per_token, 1, 100_000));
        }
        ranges
    }

    /// Problems beyond the ranges: settings this deployable does not take.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if D::EVENT_STREAMS.is_none() {
            for (key, value) in [
                ("http.event_streams_max", self.event_streams_max),
                (
                    "http.event_streams_per_token_max",
                    self.event_streams_per_token_max,
                ),
            ] {
                if value.is_some() {
                    problems.push(format!("{key}: this program serves no event streams"));
                }
            }
        }
        problems
    }

    /// Connections one client address may hold at once.
    pub fn connections_per_address(&self) -> u64 {
        self.connections_per_address_max
            .or(D::CONNECTIONS_PER_ADDRESS_MAX)
            .unwrap_or(self.connections_max)
    }

    /// Live event streams allowed in all and per token.
    pub fn event_streams(&self) -> (u64, u64) {
        let (all, per_token) = D::EVENT_STREAMS.unwrap_or((0, 0));
        (
            self.event_streams_max.unwrap_or(all),
            self.event_streams_per_token_max.unwrap_or(per_token),
        )
    }

    /// Binds `listen` and serves `app` there in a task of its own until `shutdown` turns true,
    /// with these limits; answers the address it got (port 0 picks a free one).
    pub async fn start(
        &self,
        app: axum::Router,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), crate::StartupError> {
        let (listener, addr) = super::bind(self.listen).await?;
        let task = super::spawn_server(listener, app, self.server_limits(), shutdown);
        Ok((addr, task))
    }

    /// What the server loop allows its clients.
    pub fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            connections_max: usize::try_from(self.connections_max).unwrap_or(usize::MAX),
            connections_per_address_max: usize::try_from(self.connections_per_address())
                .unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct NoStreams;
    impl HttpDefaults for NoStreams {
        const LISTEN: SocketAddr =
            SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7070);
        const CONNECTIONS_MAX: u64 = 256;
        const CONNECTIONS_PER_ADDRESS_MAX: Option<u64> = None;
        const EVENT_STREAMS: Option<(u64, u64)> = None;
    }

    #[derive(Debug, Clone)]
    struct Streams;
    impl HttpDefaults for Streams {
        const LISTEN: SocketAddr =
            SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
        const CONNECTIONS_MAX: u64 = 1_024;
        const CONNECTIONS_PER_ADDRESS_MAX: Option<u64> = Some(64);
        const EVENT_STREAMS: Option<(u64, u64)> = Some((256, 8));
    }

    #[test]
    fn each_deployable_has_its_defaults_and_only_the_keys_it_serves() {
        let agent: HttpConfig<NoStreams> = toml::from_str("").expect("empty");
        assert_eq!(agent.listen.port(), 7070);
        assert_eq!(agent.server_limits().connections_per_address_max, 256);
        // Without a per-address default, one address may take as many as the server takes.
        let raised: HttpConfig<NoStreams> =
            toml::from_str("connections_max = 1000").expect("parses");
        assert_eq!(raised.server_limits().connections_per_address_max, 1000);
        assert!(agent.problems().is_empty());
        assert!(!agent.ranges().iter().any(|r| r.0.starts_with("http.event")));
        let set: HttpConfig<NoStreams> = toml::from_str("event_streams_max = 3").expect("parses");
        assert_eq!(
            set.problems(),
            ["http.event_streams_max: this program serves no event streams"]
        );

        let hub: HttpConfig<Streams> =
            toml::from_str("event_streams_per_token_max = 2").expect("parses");
        assert_eq!((hub.listen.port(), hub.event_streams()), (8080, (256, 2)));
        assert_eq!(hub.server_limits().connections_per_address_max, 64);
        assert!(hub.problems().is_empty());
        assert!(
            hub.ranges()
                .contains(&("http.event_streams_per_token_max", 2, 1, 100_000))
        );
        assert!(toml::from_str::<HttpConfig<Streams>>("bogus = 1").is_err());
    }
}
