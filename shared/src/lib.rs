//! Larder's shared core: domain types, keys, the signed wire protocol and the IO-free
//! protocol cores (reliable streams, the ledger document) used by both the agent and the hub.
//!
//! Nothing in this crate does IO: no files, sockets, clocks, tokio, SQLite or MQTT. Callers
//! pass bytes and the current time in and get bytes and decisions out.

pub mod admission;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod domain;
pub mod envelope;
pub mod ids;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod payments;
pub mod presence;
pub mod reliable;
pub mod rotation;
pub mod time;
pub mod topics;

pub use ids::{DeviceId, FridgeId, IdError, OrderId, RegionId, SiteId, Sku, UnitId};
pub use keys::{PublicKey, SecretKey, Signature};
