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
    CHANGE_BYTES_MAX
        + ENTRY_OVERHEAD_BYTES_MAX
        + BATCH_OVERHEAD_BYTES_MAX
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

/// Bytes of a unit's batch label (a production lot).
pub const BATCH_LEN_MAX: usize = 64;

/// A free-text label a client gives: at most `max` bytes, no control characters.
pub fn label(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.len() > max {
        return Err(Invalid::field(
            field,
            format!("{} bytes; at most {max}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid::field(field, "control characters are not allowed"));
    }
    Ok(())
}

/// What any record of a unit's load holds to, wherever it was made: its batch label is
/// bounded (the ledger checks this on every load).
pub fn unit_fields(unit: &crate::domain::RefillUnit) -> Result<(), Invalid> {
    if let Some(batch) = &unit.batch {
        label(
            &format!("unit {} batch", unit.unit_id),
            batch,
            BATCH_LEN_MAX,
        )?;
    }
    Ok(())
}

/// A unit a client asks to load now (a refill, a door session's added units, an import row):
/// [`unit_fields`], and it has not expired at `now_ms`.
pub fn refill_unit(unit: &crate::domain::RefillUnit, now_ms: i64) -> Result<(), Invalid> {
    unit_fields(unit)?;
    if unit.expires_at_ms <= now_ms {
        return Err(Invalid::field(
            format!("unit {} expires_at", unit.unit_id),
            "already expired: a unit is loaded before it expires",
        ));
    }
    Ok(())
}

/// Units a client asks to load now into a fridge whose device holds `catalog`: each by
/// [`refill_unit`], and of a sku the catalog sells (unless no catalog has arrived yet: version 0).
pub fn loads(
    units: &[crate::domain::RefillUnit],
    catalog: &crate::catalog::Catalog,
    now_ms: i64,
) -> Result<(), Invalid> {
    for unit in units {
        refill_unit(unit, now_ms)?;
        if catalog.version > 0 && catalog.item(&unit.sku).is_none() {
            return Err(Invalid::field(
                format!("unit {} sku", unit.unit_id),
                format!("{} is not in catalog version {}", unit.sku, catalog.version),
            ));
        }
    }
    Ok(())
}

/// The prefix of the ids the hub gives subscriptions, and so of their occurrences' order ids
/// (`{subscription}-{date}`).
pub const SUBSCRIPTION_ID_PREFIX: &str = "sub-";

/// An order id a client chooses: not in the subscriptions' namespace, where it could take the
/// id of an occurrence still to be made. (The hub also refuses ids in an enrolled device's
/// namespace and ids the region holds already.)
pub fn client_order_id(id: &crate::ids::OrderId) -> Result<(), Invalid> {
    if id.as_str().starts_with(SUBSCRIPTION_ID_PREFIX) {
        return Err(Invalid::field(
            "order_id",
            format!(
                "ids beginning {SUBSCRIPTION_ID_PREFIX:?} are the subscriptions' occurrences: \
                 choose another id, or leave order_id out"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RefillUnit;
    use crate::ids::{Sku, UnitId};

    fn unit(batch: Option<&str>, expires_at_ms: i64) -> RefillUnit {
        RefillUnit {
            unit_id: UnitId::new("u-1").expect("id"),
            sku: Sku::new("soup").expect("sku"),
            expires_at_ms,
            batch: batch.map(str::to_owned),
        }
    }

    /// One row per rule: the input, and the field named in the refusal (or `None`: accepted).
    #[test]
    fn refill_unit_rules() {
        let long = "b".repeat(BATCH_LEN_MAX + 1);
        let at_limit = "b".repeat(BATCH_LEN_MAX);
        let huge = "x".repeat(400_000);
        let cases: Vec<(RefillUnit, Option<&str>)> = vec![
            (unit(None, 2_000), None),
            (unit(Some(&at_limit), 2_000), None),
            (unit(Some(&long), 2_000), Some("unit u-1 batch")),
            (unit(Some(&huge), 2_000), Some("unit u-1 batch")),
            (unit(Some("lot\n7"), 2_000), Some("unit u-1 batch")),
            (unit(None, 1_000), Some("unit u-1 expires_at")),
            (unit(None, -5), Some("unit u-1 expires_at")),
        ];
        for (u, want) in cases {
            let got = refill_unit(&u, 1_000).err().map(|e| match e {
                Invalid::Field { field, .. } => field,
                other => other.to_string(),
            });
            assert_eq!(
                got.as_deref(),
                want,
                "{:?}",
                u.batch.as_ref().map(String::len)
            );
        }
    }
}
