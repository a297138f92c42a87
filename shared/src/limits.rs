//! The limits every entry point applies, in one place: the byte size of a ledger change and of
//! a message, and the rules for what a client may write (field lengths, time ranges, counts).
//!
//! The agent's local API, the hub's API and the importer call these same functions, so a
//! limit is never checked in one entry point and missed in another. Each rule answers an
//! [`Invalid`] naming the field and the limit, which the HTTP layers turn into 422 (or 413 for
//! [`Invalid::TooLarge`]).

use crate::envelope::ENVELOPE_OVERHEAD_BYTES_MAX;
use crate::ids::ID_LEN_MAX;

/// The smallest `mqtt.max_message_bytes` a hub or device may be configured with.
pub const MESSAGE_BYTES_MIN: usize = 16 * 1024;
/// Bytes one stream entry spends besides its change (sequence, ledger id, epoch, kind, audit
/// link, length prefixes), and a batch besides its entries (range, head signature).
pub const ENTRY_OVERHEAD_BYTES_MAX: usize = 10 + 1 + ID_LEN_MAX + 5 + 1 + 33 + 5;
const BATCH_OVERHEAD_BYTES_MAX: usize = 2 * 10 + 2 + 64 + 8;
/// The largest ledger change any write path makes. A change this size, alone in an envelope,
/// fits the smallest message a device or hub may be configured with, so every change can be
/// sent; the ledger splits a command's writes into as many changes as that takes.
pub const CHANGE_BYTES_MAX: usize = 15 * 1024;
const _: () = assert!(
    CHANGE_BYTES_MAX + ENTRY_OVERHEAD_BYTES_MAX + BATCH_OVERHEAD_BYTES_MAX
        + ENVELOPE_OVERHEAD_BYTES_MAX
        <= MESSAGE_BYTES_MIN
);

/// Why a client's input was refused: the field and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// A field breaks a rule.
    #[error("{field}: {rule}")]
    Field { field: String, rule: String },
    /// The request would make more than a change or message may carry.
    #[error("{what} is {bytes} bytes; at most {limit} fit")]
    TooLarge {
        what: String,
        bytes: usize,
        limit: usize,
    },
}

impl Invalid {
    pub fn field(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::Field {
            field: field.into(),
            rule: rule.into(),
        }
    }
}
