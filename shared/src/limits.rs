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
/// link, length prefixes, the hub's signature), and a batch besides its entries (range, head
/// signature).
pub const ENTRY_OVERHEAD_BYTES_MAX: usize = 10 + 1 + ID_LEN_MAX + 5 + 1 + 33 + 5 + 2 + 64;
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

/// A sale a device records in `fridge`, which holds the ledgers `held`: a unit that another of
/// them knows is sold from that fridge only (and so under its own sku, which that ledger
/// checks); a unit no ledger here knows may still be sold, its refill on the way.
pub fn sale_units_belong<'a>(
    held: impl IntoIterator<Item = (&'a crate::ids::FridgeId, &'a crate::ledger::Ledger)> + Clone,
    fridge: &crate::ids::FridgeId,
    lines: &[crate::domain::SaleLine],
) -> Result<(), crate::ledger::LedgerError> {
    for unit in lines.iter().filter_map(|l| l.unit_id.as_ref()) {
        let here = held
            .clone()
            .into_iter()
            .any(|(f, l)| f == fridge && l.knows_unit(unit));
        if !here
            && held
                .clone()
                .into_iter()
                .any(|(f, l)| f != fridge && l.knows_unit(unit))
        {
            return Err(crate::ledger::LedgerError::UnitNotAvailable {
                unit: unit.clone(),
                state: "in another fridge",
            });
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

/// Items a catalog may list.
pub const CATALOG_ITEMS_MAX: usize = 1000;
/// The highest price of one item, in minor units (10,000.00 in a two-decimal currency), so
/// that no order's total can overflow and no slip of a key can sell a meal for a fortune.
pub const PRICE_MINOR_MAX: i64 = 1_000_000;
/// Bytes of an item's name.
pub const NAME_LEN_MAX: usize = 128;
/// Allergens an item may list, and bytes of each.
pub const ALLERGENS_MAX: usize = 32;
pub const ALLERGEN_LEN_MAX: usize = 64;

/// One catalog item, wherever it comes from (the hub's config, a catalog `PUT`, an import row).
pub fn catalog_item(item: &crate::catalog::CatalogItem) -> Result<(), Invalid> {
    let field = |f: &str| format!("sku {} {f}", item.sku);
    if !(0..=PRICE_MINOR_MAX).contains(&item.price_minor) {
        return Err(Invalid::field(
            field("price_minor"),
            format!("{}: from 0 to {PRICE_MINOR_MAX}", item.price_minor),
        ));
    }
    if item.name.trim().is_empty() {
        return Err(Invalid::field(field("name"), "empty"));
    }
    label(&field("name"), &item.name, NAME_LEN_MAX)?;
    if item.allergens.len() > ALLERGENS_MAX {
        return Err(Invalid::field(
            field("allergens"),
            format!("{} listed; at most {ALLERGENS_MAX}", item.allergens.len()),
        ));
    }
    for a in &item.allergens {
        label(&field("allergens"), a, ALLERGEN_LEN_MAX)?;
    }
    Ok(())
}

/// A catalog to publish: an ISO 4217 currency, 1 to [`CATALOG_ITEMS_MAX`] items, each sku once,
/// each item by [`catalog_item`].
pub fn catalog(currency: &str, items: &[crate::catalog::CatalogItem]) -> Result<(), Invalid> {
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Invalid::field(
            "currency",
            format!("{currency:?} is not an ISO 4217 code"),
        ));
    }
    if items.is_empty() || items.len() > CATALOG_ITEMS_MAX {
        return Err(Invalid::field(
            "items",
            format!(
                "{} items; a catalog lists 1 to {CATALOG_ITEMS_MAX}",
                items.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for item in items {
        if !seen.insert(&item.sku) {
            return Err(Invalid::field(format!("sku {}", item.sku), "listed twice"));
        }
        catalog_item(item)?;
    }
    Ok(())
}

/// Bytes of a customer id (the app's name for its customer).
pub const CUSTOMER_ID_LEN_MAX: usize = 128;

/// A customer id a client gives: 1 to [`CUSTOMER_ID_LEN_MAX`] bytes, no control characters.
pub fn customer_id(id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(Invalid::field("customer_id", "empty"));
    }
    label("customer_id", id, CUSTOMER_ID_LEN_MAX)
}

/// The weekdays a subscription names, Monday first.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Lines a subscription may have, and meals of one sku per delivery.
pub const SUBSCRIPTION_LINES_MAX: usize = 20;
pub const SUBSCRIPTION_SKU_QUANTITY_MAX: u32 = 20;
/// How far from today a subscription's start may be, either way, in days (five years): an
/// import may carry subscriptions that began before, and a customer may plan ahead.
pub const SUBSCRIPTION_START_DAYS_MAX: i64 = 1827;

/// A subscription's lines and weekdays: 1 to [`SUBSCRIPTION_LINES_MAX`] lines, each sku's
/// quantity over all its lines 1 to [`SUBSCRIPTION_SKU_QUANTITY_MAX`], weekdays named once
/// each from `mon` to `sun`.
pub fn subscription(
    lines: &[crate::domain::AppOrderLine],
    weekdays: &[String],
) -> Result<(), Invalid> {
    if lines.is_empty() || lines.len() > SUBSCRIPTION_LINES_MAX {
        return Err(Invalid::field(
            "lines",
            format!("a subscription has 1 to {SUBSCRIPTION_LINES_MAX} lines"),
        ));
    }
    let mut per_sku: std::collections::BTreeMap<&crate::ids::Sku, u32> = Default::default();
    for l in lines {
        if l.quantity == 0 {
            return Err(Invalid::field("quantity", "at least 1"));
        }
        *per_sku.entry(&l.sku).or_default() += l.quantity.min(SUBSCRIPTION_SKU_QUANTITY_MAX + 1);
    }
    if let Some((sku, q)) = per_sku
        .iter()
        .find(|(_, q)| **q > SUBSCRIPTION_SKU_QUANTITY_MAX)
    {
        return Err(Invalid::field(
            format!("sku {sku} quantity"),
            format!("{q}+ over its lines; at most {SUBSCRIPTION_SKU_QUANTITY_MAX} of a sku"),
        ));
    }
    if weekdays.is_empty() || weekdays.iter().any(|w| !WEEKDAYS.contains(&w.as_str())) {
        return Err(Invalid::field(
            "weekdays",
            "one or more of mon, tue, wed, thu, fri, sat, sun",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = weekdays.iter().find(|w| !seen.insert(w.as_str())) {
        return Err(Invalid::field(
            "weekdays",
            format!("{twice} is named twice"),
        ));
    }
    Ok(())
}

/// A subscription's dates, as days from the epoch: it starts within
/// [`SUBSCRIPTION_START_DAYS_MAX`] of today, either way, and ends no earlier than it starts.
pub fn subscription_dates(start_day: i64, end_day: Option<i64>, today: i64) -> Result<(), Invalid> {
    if (start_day - today).abs() > SUBSCRIPTION_START_DAYS_MAX {
        return Err(Invalid::field(
            "start_date",
            format!("within {SUBSCRIPTION_START_DAYS_MAX} days of today"),
        ));
    }
    if end_day.is_some_and(|e| e < start_day) {
        return Err(Invalid::field("end_date", "before start_date"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogItem;
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

    fn item(sku: &str, price_minor: i64, name: &str, allergens: usize) -> CatalogItem {
        CatalogItem {
            sku: Sku::new(sku).expect("sku"),
            name: name.into(),
            price_minor,
            allergens: (0..allergens).map(|i| format!("a{i}")).collect(),
            shelf_life_hours: 24,
        }
    }

    fn field_of(r: Result<(), Invalid>) -> Option<String> {
        r.err().map(|e| match e {
            Invalid::Field { field, .. } => field,
            other => other.to_string(),
        })
    }

    #[test]
    fn catalog_rules() {
        let ok = item("soup", 590, "Soup", 2);
        let long_name = "n".repeat(NAME_LEN_MAX + 1);
        let cases: Vec<(&str, Vec<CatalogItem>, Option<&str>)> = vec![
            ("EUR", vec![ok.clone()], None),
            ("EUR", vec![item("soup", 0, "Free soup", 0)], None),
            (
                "EUR",
                vec![item("soup", PRICE_MINOR_MAX, "Dear soup", 0)],
                None,
            ),
            ("EUR", vec![], Some("items")),
            ("EUR", vec![ok.clone(); 2], Some("sku soup")),
            ("eur", vec![ok.clone()], Some("currency")),
            (
                "EUR",
                vec![item("soup", -1, "Soup", 0)],
                Some("sku soup price_minor"),
            ),
            (
                "EUR",
                vec![item("soup", i64::MAX, "Soup", 0)],
                Some("sku soup price_minor"),
            ),
            (
                "EUR",
                vec![item("soup", 590, " ", 0)],
                Some("sku soup name"),
            ),
            (
                "EUR",
                vec![item("soup", 590, &long_name, 0)],
                Some("sku soup name"),
            ),
            (
                "EUR",
                vec![item("soup", 590, "Soup", ALLERGENS_MAX + 1)],
                Some("sku soup allergens"),
            ),
        ];
        for (currency, items, want) in cases {
            assert_eq!(
                field_of(catalog(currency, &items)).as_deref(),
                want,
                "{currency} {items:?}"
            );
        }
        let many: Vec<CatalogItem> = (0..=CATALOG_ITEMS_MAX)
            .map(|i| item(&format!("s{i}"), 1, "S", 0))
            .collect();
        assert_eq!(field_of(catalog("EUR", &many)).as_deref(), Some("items"));
    }

    #[test]
    fn customer_and_order_id_rules() {
        let huge = "c".repeat(100_000);
        let cases: Vec<(&str, Option<&str>)> = vec![
            ("cust-1", None),
            ("", Some("customer_id")),
            (&huge, Some("customer_id")),
            ("a\u{0}b", Some("customer_id")),
        ];
        for (id, want) in cases {
            assert_eq!(field_of(customer_id(id)).as_deref(), want, "{}", id.len());
        }
        let order = |s: &str| crate::ids::OrderId::new(s).expect("id");
        assert_eq!(field_of(client_order_id(&order("app-7"))), None);
        assert_eq!(field_of(client_order_id(&order("subway-1"))), None);
        assert_eq!(
            field_of(client_order_id(&order("sub-0a1b-2030-01-01"))).as_deref(),
            Some("order_id")
        );
    }

    #[test]
    fn subscription_rules() {
        let line = |sku: &str, quantity| crate::domain::AppOrderLine {
            sku: Sku::new(sku).expect("sku"),
            quantity,
        };
        let days = |d: &[&str]| d.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let cases: Vec<(Vec<crate::domain::AppOrderLine>, Vec<String>, Option<&str>)> = vec![
            (vec![line("soup", 2)], days(&["mon", "wed"]), None),
            (
                vec![line("soup", 10), line("salad", 20)],
                days(&["sun"]),
                None,
            ),
            (vec![], days(&["mon"]), Some("lines")),
            (vec![line("soup", 1); 21], days(&["mon"]), Some("lines")),
            (vec![line("soup", 0)], days(&["mon"]), Some("quantity")),
            (
                vec![line("soup", 21)],
                days(&["mon"]),
                Some("sku soup quantity"),
            ),
            (
                vec![line("soup", 15), line("soup", 15)],
                days(&["mon"]),
                Some("sku soup quantity"),
            ),
            (vec![line("soup", 1)], days(&[]), Some("weekdays")),
            (
                vec![line("soup", 1)],
                days(&["mon", "mon"]),
                Some("weekdays"),
            ),
            (vec![line("soup", 1)], days(&["monday"]), Some("weekdays")),
        ];
        for (lines, weekdays, want) in cases {
            assert_eq!(
                field_of(subscription(&lines, &weekdays)).as_deref(),
                want,
                "{lines:?} {weekdays:?}"
            );
        }
        let today = 20_000;
        let cases: [(i64, Option<i64>, Option<&str>); 8] = [
            (today, None, None),
            (today - 1, Some(today + 30), None),
            (today + SUBSCRIPTION_START_DAYS_MAX, None, None),
            (today - SUBSCRIPTION_START_DAYS_MAX, None, None),
            (-4_371_000, None, Some("start_date")),
            (
                today + SUBSCRIPTION_START_DAYS_MAX + 1,
                None,
                Some("start_date"),
            ),
            (
                today - SUBSCRIPTION_START_DAYS_MAX - 1,
                None,
                Some("start_date"),
            ),
            (today + 3, Some(today + 2), Some("end_date")),
        ];
        for (start, end, want) in cases {
            assert_eq!(
                field_of(subscription_dates(start, end, today)).as_deref(),
                want,
                "{start} {end:?}"
            );
        }
    }
}
