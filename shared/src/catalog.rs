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
