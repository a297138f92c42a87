//! Version 2 of the envelope, the one before this build's: read from, and written to, a device
//! one release behind (see `docs/PROTOCOL.md`, "Versions").
//!
//! It differs from version 3 in two places: its acknowledgement carries no store generation,
//! and its stream entries no hub signature. Every other body encodes the same way, so these
//! types only rename; they borrow what they write and move what they read, never copying change
//! bytes.

use serde::{Deserialize, Serialize};

use super::{EntryKind, TimeBeacon};
use crate::FridgeId;
use crate::catalog::Catalog;
use crate::rotation::{KeyRotated, KeyRotation};

/// Version 2's stream entry, as read.
#[derive(Deserialize)]
pub(super) struct Entry {
    seq: u64,
    ledger: FridgeId,
    epoch: u32,
    kind: EntryKind,
    prev: Option<[u8; 32]>,
    #[serde(with = "serde_bytes")]
    change: Vec<u8>,
}

/// Version 2's batch, as read.
#[derive(Deserialize)]
pub(super) struct Batch {
    after: u64,
    up_to: u64,
    entries: Vec<Entry>,
    #[serde(with = "serde_bytes")]
    head_sig: Option<Vec<u8>>,
}

/// A stream entry borrowed to be written in version 2 (its hub signature left out).
#[derive(Serialize)]
pub(super) struct EntryRef<'a> {
    seq: u64,
    ledger: &'a FridgeId,
    epoch: u32,
    kind: EntryKind,
    prev: &'a Option<[u8; 32]>,
    #[serde(with = "serde_bytes")]
    change: &'a [u8],
}

/// A batch borrowed to be written in version 2.
#[derive(Serialize)]
pub(super) struct BatchRef<'a> {
    after: u64,
    up_to: u64,
    entries: Vec<EntryRef<'a>>,
    #[serde(with = "serde_bytes")]
    head_sig: &'a Option<Vec<u8>>,
}

impl From<Batch> for super::Batch {
    fn from(b: Batch) -> Self {
        Self {
            after: b.after,
            up_to: b.up_to,
            entries: b
                .entries
                .into_iter()
                .map(|e| super::Entry {
                    seq: e.seq,
                    ledger: e.ledger,
                    epoch: e.epoch,
                    kind: e.kind,
                    prev: e.prev,
                    change: e.change,
                    hub_sig: None,
                })
                .collect(),
            head_sig: b.head_sig,
        }
    }
}

impl<'a> From<&'a super::Batch> for BatchRef<'a> {
    fn from(b: &'a super::Batch) -> Self {
        Self {
            after: b.after,
            up_to: b.up_to,
            entries: b
                .entries
                .iter()
                .map(|e| EntryRef {
                    seq: e.seq,
                    ledger: &e.ledger,
                    epoch: e.epoch,
                    kind: e.kind,
                    prev: &e.prev,
                    change: &e.change,
                })
                .collect(),
            head_sig: &b.head_sig,
        }
    }
}

/// Version 2's acknowledgement.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct Ack {
    up_to: u64,
    gap: bool,
}

/// A version 2 body as read: the same variants, in the same order, as [`super::Body`].
#[derive(Deserialize)]
pub(super) enum Body {
    Changes(Batch),
    Ack(Ack),
    Catalog(Catalog),
    Time(TimeBeacon),
    KeyRotation(KeyRotation),
    KeyRotated(KeyRotated),
}

/// A body borrowed to be written in version 2.
#[derive(Serialize)]
pub(super) enum BodyRef<'a> {
    Changes(BatchRef<'a>),
    Ack(Ack),
    Catalog(&'a Catalog),
    Time(&'a TimeBeacon),
    KeyRotation(&'a KeyRotation),
    KeyRotated(&'a KeyRotated),
}

impl From<Body> for super::Body {
    fn from(body: Body) -> Self {
        match body {
            Body::Changes(b) => Self::Changes(b.into()),
            Body::Ack(a) => Self::Ack(super::Ack {
                up_to: a.up_to,
                gap: a.gap,
                generation: None,
                origin: None,
            }),
            Body::Catalog(c) => Self::Catalog(c),
            Body::Time(t) => Self::Time(t),
            Body::KeyRotation(r) => Self::KeyRotation(r),
            Body::KeyRotated(r) => Self::KeyRotated(r),
        }
    }
}

impl<'a> From<&'a super::Body> for BodyRef<'a> {
    /// The generation of an acknowledgement and the hub's signatures of its changes are left
    /// out: a version 2 device has no use for them.
    fn from(body: &'a super::Body) -> Self {
        match body {
            super::Body::Changes(b) => Self::Changes(b.into()),
            super::Body::Ack(a) => Self::Ack(Ack {
                up_to: a.up_to,
                gap: a.gap,
            }),
            super::Body::Catalog(c) => Self::Catalog(c),
            super::Body::Time(t) => Self::Time(t),
            super::Body::KeyRotation(r) => Self::KeyRotation(r),
            super::Body::KeyRotated(r) => Self::KeyRotated(r),
        }
    }
}
