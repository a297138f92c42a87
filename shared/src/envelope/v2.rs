//! Version 2 of the envelope, the one before this build's: read from, and written to, a device
//! one release behind (see `docs/PROTOCOL.md`, "Versions").
//!
//! It differs from version 3 in one place: its acknowledgement carries no store generation. Every
//! other body encodes the same way, so these types only rename; they borrow what they write and
//! move what they read, never copying change bytes.

use serde::{Deserialize, Serialize};

use super::{Batch, TimeBeacon};
use crate::catalog::Catalog;
use crate::rotation::{KeyRotated, KeyRotation};

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
    Changes(&'a Batch),
    Ack(Ack),
    Catalog(&'a Catalog),
    Time(&'a TimeBeacon),
    KeyRotation(&'a KeyRotation),
    KeyRotated(&'a KeyRotated),
}

impl From<Body> for super::Body {
    fn from(body: Body) -> Self {
        match body {
            Body::Changes(b) => Self::Changes(b),
            Body::Ack(a) => Self::Ack(super::Ack {
                up_to: a.up_to,
                gap: a.gap,
                generation: None,
            }),
            Body::Catalog(c) => Self::Catalog(c),
            Body::Time(t) => Self::Time(t),
            Body::KeyRotation(r) => Self::KeyRotation(r),
            Body::KeyRotated(r) => Self::KeyRotated(r),
        }
    }
}

impl<'a> From<&'a super::Body> for BodyRef<'a> {
    /// The generation of an acknowledgement is left out: a version 2 device has no use for it.
    fn from(body: &'a super::Body) -> Self {
        match body {
            super::Body::Changes(b) => Self::Changes(b),
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
