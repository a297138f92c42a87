//! The region's catalog: a versioned list of meals with prices, published by the hub and
//! cached by agents, who price sales from the version they hold.

use serde::{Deserialize, Serialize};

use crate::ids::Sku;

/// One meal on the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogItem {
    pub sku: Sku,
    pub name: String,
    pub price_minor: i64,
    #[serde(default)]
    pub allergens: Vec<String>,
    #[serde(default)]
    pub shelf_life_hours: u32,
}

/// A catalog item as a person writes it (the hub's config, a catalog `PUT`): [`CatalogItem`]'s
/// keys and no other, so a misspelt optional key is an error instead of a silent default.
/// (`CatalogItem` itself takes unknown keys, so an older agent reads a newer hub's catalog.)
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrittenItem {
    pub sku: Sku,
    pub name: String,
    pub price_minor: i64,
    #[serde(default)]
    pub allergens: Vec<String>,
    #[serde(default)]
    pub shelf_life_hours: u32,
}

impl From<WrittenItem> for CatalogItem {
    fn from(i: WrittenItem) -> Self {
        let WrittenItem {
            sku,
            name,
            price_minor,
            allergens,
            shelf_life_hours,
        } = i;
        Self {
            sku,
            name,
            price_minor,
            allergens,
            shelf_life_hours,
        }
    }
}

/// Deserializes catalog items as [`WrittenItem`]s: for `#[serde(deserialize_with)]`.
pub fn written_items<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<CatalogItem>, D::Error> {
    let items = Vec::<WrittenItem>::deserialize(d)?;
    Ok(items.into_iter().map(CatalogItem::from).collect())
}

/// A version of a region's catalog. Versions strictly increase; 0 means "none yet".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Catalog {
    pub version: u64,
    pub currency: String,
    pub items: Vec<CatalogItem>,
}

impl Catalog {
    pub fn item(&self, sku: &Sku) -> Option<&CatalogItem> {
        self.items.iter().find(|i| &i.sku == sku)
    }
}

/// The prices of every catalog version a hub published and when: what tells a sale priced
/// from an older version than the one in effect when it was made (`price_changed`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogHistory {
    /// `(version, published_at_ms, price per sku)`, in version order.
    versions: Vec<(u64, i64, std::collections::BTreeMap<Sku, i64>)>,
    currency: String,
}

/// What a version prices a set of lines at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionPrice {
    pub version: u64,
    pub published_at_ms: i64,
    pub total_minor: i64,
}

impl CatalogHistory {
    /// Adds a version published at `published_at_ms`; versions must come in increasing order
    /// (an older or repeated one is ignored).
    pub fn push(&mut self, catalog: &Catalog, published_at_ms: i64) {
        if self
            .versions
            .last()
            .is_some_and(|(v, _, _)| *v >= catalog.version)
        {
            return;
        }
        self.currency.clone_from(&catalog.currency);
        self.versions.push((
            catalog.version,
            published_at_ms,
            catalog
                .items
                .iter()
                .map(|i| (i.sku.clone(), i.price_minor))
                .collect(),
        ));
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The newest version published at or before `at_ms`.
    pub fn effective_at(&self, at_ms: i64) -> Option<u64> {
        self.versions
            .iter()
            .rev()
            .find(|(_, at, _)| *at <= at_ms)
            .map(|(v, _, _)| *v)
    }

    /// What `version` prices `lines` (sku, quantity) at; `None` if the version is unknown or
    /// lacks one of the skus.
    pub fn price(&self, version: u64, lines: &[(Sku, u32)]) -> Option<VersionPrice> {
        let (_, at, prices) = self.versions.iter().find(|(v, _, _)| *v == version)?;
        let mut total = 0i64;
        for (sku, qty) in lines {
            total = total.checked_add(prices.get(sku)?.checked_mul(i64::from(*qty))?)?;
        }
        Some(VersionPrice {
            version,
            published_at_ms: *at,
            total_minor: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(version: u64, price: i64) -> Catalog {
        Catalog {
            version,
            currency: "EUR".into(),
            items: vec![CatalogItem {
                sku: Sku::new("soup").unwrap_or_else(|_| unreachable!()),
                name: "Soup".into(),
                price_minor: price,
                allergens: vec![],
                shelf_life_hours: 24,
            }],
        }
    }

    #[test]
    fn the_version_in_effect_and_its_prices() {
        let mut h = CatalogHistory::default();
        h.push(&catalog(1, 500), 1_000);
        h.push(&catalog(2, 650), 5_000);
        h.push(&catalog(2, 999), 6_000); // a repeat is ignored
        assert_eq!(h.effective_at(999), None);
        assert_eq!(h.effective_at(4_999), Some(1));
        assert_eq!(h.effective_at(5_000), Some(2));
        let soup = Sku::new("soup").unwrap_or_else(|_| unreachable!());
        let lines = [(soup.clone(), 2)];
        assert_eq!(h.price(1, &lines).map(|p| p.total_minor), Some(1_000));
        assert_eq!(h.price(2, &lines).map(|p| p.total_minor), Some(1_300));
        assert_eq!(h.price(3, &lines), None);
        let other = Sku::new("stew").unwrap_or_else(|_| unreachable!());
        assert_eq!(h.price(2, &[(other, 1)]), None);
    }
}
