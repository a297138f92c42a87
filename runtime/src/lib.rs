//! The IO plumbing Larder's agent and hub share, below both and above the pure core
//! (`larder-shared`): the HTTP server loop and the contract's error shape ([`http`]), SQLite
//! connections, readers and the checkpointer ([`sqlite`]), the read model both keep of a
//! ledger ([`projection`]), the one clock ([`clock`]), MQTT requests ([`mqtt`]), TLS client
//! config ([`tls`]), logging and signals ([`cli`]), TOML configs ([`config`]) and key files
//! ([`keys`]).
//!
//! Nothing here knows a fridge from a region: what is the agent's or the hub's lives in their
//! crates.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod clock;
pub mod config;
pub mod http;
pub mod keys;
pub mod mqtt;
pub mod projection;
pub mod sqlite;
pub mod tls;

pub use clock::Clock;

/// What the runtime's part of a start-up can fail at, for the agent's and the hub's own start
/// errors to carry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    #[error("data directory {}: {source}", path.display())]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}
