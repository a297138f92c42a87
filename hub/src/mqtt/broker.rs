//! The embedded broker (rumqttd on its own thread) and who it lets in: the hub by its client
//! id, devices by a fresh signed connect token, each token once.

use super::*;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the broker on {0} did not accept connections within 10 s")]
    NotReady(SocketAddr),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

/// Longest a connect token stays valid, either side of the hub's clock.
pub const CONNECT_TOKEN_AGE_MS_MAX: i64 = 5 * 60 * 1000;

/// Connect-token nonces remembered to refuse replays (older ones are stale anyway).
pub(super) const NONCES_MAX: usize = 100_000;

/// Who may connect to the embedded broker: the hub's own client and enrolled, unrevoked devices
/// of its regions, each proving its key with a fresh connect token as the MQTT password
/// (checked through rumqttd's external authentication hook). A token is accepted once.
#[derive(Debug)]
pub struct Admission {
    pub hub_client_id: String,
    pub hub_key: larder_shared::PublicKey,
    pub regions: Vec<Arc<crate::store::RegionReads>>,
    nonces: std::sync::Mutex<HashMap<[u8; 16], i64>>,
    /// Where each admitted connection's session is recorded, for presence.
    presence: PresenceBook,
    /// Judges connect tokens' ages.
    clock: larder_runtime::Clock,
}

impl Admission {
    pub fn new(
        hub_client_id: String,
        hub_key: larder_shared::PublicKey,
        regions: Vec<Arc<crate::store::RegionReads>>,
        presence: PresenceBook,
        clock: larder_runtime::Clock,
    ) -> Self {
        Self {
            hub_client_id,
            hub_key,
            regions,
            nonces: std::sync::Mutex::new(HashMap::new()),
            presence,
            clock,
        }
    }

    /// Whether this CONNECT may proceed.
    pub fn admit(&self, client_id: &str, password: &str, now_ms: i64) -> Result<(), &'static str> {
        let device = DeviceId::new(client_id).map_err(|_| "bad_client_id")?;
        let keys = if client_id == self.hub_client_id {
            vec![self.hub_key]
        } else {
            let (reads, record) = self
                .regions
                .iter()
                .find_map(|r| r.device(&device).ok().flatten().map(|d| (r, d)))
                .ok_or("unknown_device")?;
            if record.revoked_at_ms.is_some() {
                return Err("revoked_device");
            }
            // The key in force, then keys a rotation retired that are inside their overlap.
            let mut keys = vec![record.public_key];
            keys.extend(
                reads
                    .retired_keys(&device, Some(now_ms))
                    .unwrap_or_default(),
            );
            keys
        };
        let mut verdict = Err("bad_token");
        for key in &keys {
            verdict = larder_shared::auth::verify_connect_token(
                password,
                key,
                &device,
                now_ms,
                CONNECT_TOKEN_AGE_MS_MAX,
            )
            .map_err(|e| match e {
                larder_shared::auth::TokenError::Stale { .. } => "stale_token",
                _ => "bad_token",
            });
            if verdict.is_ok() {
                break;
            }
        }
        let nonce = verdict?;
        let mut nonces = self.nonces.lock().map_err(|_| "internal")?;
        if nonces.len() >= NONCES_MAX {
            nonces.retain(|_, at| now_ms - *at <= CONNECT_TOKEN_AGE_MS_MAX);
        }
        if nonces.len() >= NONCES_MAX {
            return Err("busy");
        }
        if nonces.insert(nonce, now_ms).is_some() {
            return Err("replayed_token");
        }
        drop(nonces);
        if let Some(session) = larder_shared::auth::token_session(password) {
            self.presence.admitted(&device, session);
        }
        Ok(())
    }
}

/// Segments of a device's `down` subscription the embedded broker keeps (see
/// [`start_embedded_broker`]).
pub const DOWN_SEGMENTS: usize = 3;

/// Starts rumqttd on its own thread and waits until it accepts TCP connections.
///
/// rumqttd only logs bind errors and never reports readiness, so the address is checked free
/// first and then polled until it answers.
///
/// rumqttd keeps what it routes to a subscription in memory, in segments, and drops the
/// oldest segment only when a new one would pass the count, whether delivered or not. A
/// device's `down` subscription gets three segments of `down_segment_bytes`: the hub's
/// downlink window in bytes (`sync.inflight_bytes_max`) and one largest envelope, which is how
/// far a window can go. The two full segments kept behind the one being filled hold at least
/// two windows, so a device that falls behind by more loses the oldest, and the hub's
/// go-back-N resend still finds a whole copy of its window within what is kept.
///
/// One piece: rumqttd's settings are one struct, filled in from the hub's config.
pub fn start_embedded_broker(
    addr: SocketAddr,
    tls: Option<&crate::config::MqttTlsConfig>,
    max_payload_bytes: usize,
    connections_max: usize,
    down_segment_bytes: usize,
    admission: Arc<Admission>,
    metrics: Arc<HubMetrics>,
) -> Result<(), BrokerError> {
    std::net::TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_payload_bytes,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |client_id: String, _user: String, password: String| {
        let (admission, metrics) = (admission.clone(), metrics.clone());
        async move {
            let now = admission.clock.network_ms();
            match admission.admit(&client_id, &password, now) {
                Ok(()) => true,
                Err(reason) => {
                    metrics
                        .connections_refused
                        .get_or_create(&vec![("reason", reason.to_owned())])
                        .inc();
                    warn!(client_id = %client_id, reason, "broker connection refused");
                    false
                }
            }
        }
    });
    let mut v4 = HashMap::new();
    v4.insert(
        "v4".to_owned(),
        rumqttd::ServerSettings {
            name: "v4".into(),
            listen: addr,
            tls: tls.and_then(|t| {
                Some(rumqttd::TlsConfig::Rustls {
                    capath: None,
                    certpath: t.cert_file.as_ref()?.display().to_string(),
                    keypath: t.key_file.as_ref()?.display().to_string(),
                })
            }),
            next_connection_delay_ms: 1,
            connections,
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: connections_max,
            max_outgoing_packet_count: 1_000,
            // Any filter not named below (the catalog's, presence's, or a wildcard an admitted
            // device subscribes to): 3 MiB at most.
            max_segment_size: 1024 * 1024,
            max_segment_count: 3,
            // Keys that no subscription can match two of: rumqttd applies the last match.
            custom_segment: Some(HashMap::from([
                (
                    topics::all_devices_filter(DeviceTopic::Down),
                    rumqttd::SegmentConfig {
                        // rumqttd refuses (panics on) segments under 1 KiB.
                        max_segment_size: down_segment_bytes.max(1024),
                        max_segment_count: DOWN_SEGMENTS,
                    },
                ),
                (
                    // The hub's uplink subscription, one per region (or one for all): room
                    // for bursts while the region writers catch up.
                    topics::all_devices_filter(DeviceTopic::Up),
                    rumqttd::SegmentConfig {
                        max_segment_size: 16 * 1024 * 1024,
                        max_segment_count: 8,
                    },
                ),
            ])),
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            info!(%addr, "embedded MQTT broker ready");
            return Ok(());
        }
        // Readiness poll of a broker that offers no ready signal.
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotReady(addr))
}

/// A free loopback port (for the demo and tests); the caller retries if it is taken meanwhile.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
