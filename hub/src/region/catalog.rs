//! The region writer's catalog and ratings: versions published from the config or by
//! `PUT /v1/regions/{r}/catalog`, the history of versions that `price_changed` is judged by,
//! and customers' ratings, counted in order per sku.

use std::sync::Arc;

use larder_shared::Sku;
use larder_shared::catalog::{Catalog, CatalogItem};
use sha2::Digest;
use tracing::{error, info};

use super::{Outcome, RegionError, RegionWriter};
use crate::events::EventKind;
use crate::store::{META_CATALOG, RegionBatch, StoreError};

/// The SHA-256 of the config's catalog when it was last applied: the config publishes a new
/// version only when it changes, so a version published through the API survives a restart.
const META_CATALOG_FROM_CONFIG: &str = "catalog_config_sha256";

/// What a rating request asks.
#[derive(Debug)]
pub struct RatingRequest {
    pub sku: Sku,
    pub stars: u8,
    pub customer_id: Option<String>,
}

fn config_digest(currency: &str, items: &[CatalogItem]) -> String {
    let json = serde_json::to_vec(&(currency, items)).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(json))
}

/// Why a catalog cannot be published, if it cannot (the rules of `limits::catalog`).
pub fn check_catalog(currency: &str, items: &[CatalogItem]) -> Result<(), String> {
    larder_shared::limits::catalog(currency, items).map_err(|e| e.to_string())
}

impl RegionWriter {
    /// Loads the catalog history and the rating totals; called once at open.
    pub(super) fn load_catalogs(&mut self) -> Result<(), StoreError> {
        for (catalog, at) in self.store.catalog_versions()? {
            self.catalog_history.push(&catalog, at);
        }
        self.ratings = self.store.rating_totals()?;
        Ok(())
    }

    /// Applies the config's catalog: a new version if it changed since it was last applied
    /// (or none was published yet); otherwise the stored catalog stands, including a version
    /// published through the API since. Returns the current catalog.
    pub fn ensure_catalog(
        &mut self,
        currency: &str,
        items: &[CatalogItem],
    ) -> Result<Catalog, StoreError> {
        let current: Catalog = match self.store.meta(META_CATALOG)? {
            Some(json) => {
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?
            }
            None => Catalog::default(),
        };
        let digest = config_digest(currency, items);
        let applied = self.store.meta(META_CATALOG_FROM_CONFIG)?;
        let mut batch = RegionBatch::default();
        let unchanged = current.version > 0
            && (applied.as_deref() == Some(digest.as_str())
                || (current.currency == currency && current.items == items));
        let catalog = if unchanged {
            current
        } else {
            let next = Catalog {
                version: current.version + 1,
                currency: currency.to_owned(),
                items: items.to_vec(),
            };
            info!(region = %self.region, version = next.version, "catalog published from the config");
            next
        };
        if self.catalog_history.effective_at(i64::MAX) != Some(catalog.version) {
            // A new version, or one stored before versions had a history.
            let at = if unchanged { 0 } else { self.clock.now_ms() };
            self.stage_catalog(&catalog, at, &mut batch);
        }
        if applied.as_deref() != Some(digest.as_str()) {
            batch.meta.push((META_CATALOG_FROM_CONFIG, digest));
        }
        if !batch.is_empty() {
            self.store.commit(&batch)?;
        }
        self.set_catalog(catalog.clone());
        Ok(catalog)
    }

    fn stage_catalog(&mut self, catalog: &Catalog, at_ms: i64, batch: &mut RegionBatch) {
        batch.meta.push((
            META_CATALOG,
            serde_json::to_string(catalog).unwrap_or_default(),
        ));
        batch.catalogs.push((catalog.clone(), at_ms));
        self.catalog_history.push(catalog, at_ms);
    }

    /// Makes `catalog` the one orders are priced from and the MQTT task announces.
    pub(super) fn set_catalog(&mut self, catalog: Catalog) {
        self.catalog_tx.send_replace(Arc::new(catalog.clone()));
        self.catalog = catalog;
    }

    /// `PUT /v1/regions/{r}/catalog`: stages a new version (the same items and currency change
    /// nothing and answer the current version). Published to agents once committed.
    pub(super) fn put_catalog(
        &mut self,
        currency: String,
        items: Vec<CatalogItem>,
        base: Option<u64>,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<Outcome, RegionError> {
        check_catalog(&currency, &items).map_err(RegionError::Invalid)?;
        if currency == self.catalog.currency && items == self.catalog.items {
            return Ok(Outcome::CatalogUnchanged(Box::new(self.catalog.clone())));
        }
        if let Some(base) = base
            && base != self.catalog.version
        {
            return Err(RegionError::CatalogVersionConflict {
                base,
                current: self.catalog.version,
            });
        }
        let next = Catalog {
            version: self.catalog.version + 1,
            currency,
            items,
        };
        // The version travels to every agent in one envelope.
        let size = serde_json::to_vec(&next).map_or(usize::MAX, |v| v.len());
        if size + 1024 > self.max_message_bytes {
            return Err(RegionError::CatalogTooLarge {
                size,
                max: self.max_message_bytes,
            });
        }
        self.stage_catalog(&next, now, batch);
        // Orders later in the group are priced from it; a failed commit reloads the old one.
        self.catalog = next.clone();
        self.published = Some(next.clone());
        info!(region = %self.region, version = next.version, "catalog published through the API");
        Ok(Outcome::CatalogPublished(Box::new(next)))
    }

    /// `POST /v1/regions/{r}/catalog/{sku}/ratings`: counts the rating into its sku's total.
    pub(super) fn rate(
        &mut self,
        req: RatingRequest,
        batch: &mut RegionBatch,
        now: i64,
    ) -> Result<Outcome, RegionError> {
        if !(1..=5).contains(&req.stars) {
            return Err(RegionError::Invalid(
                "stars must be a whole number from 1 to 5".into(),
            ));
        }
        if self.catalog.item(&req.sku).is_none() {
            return Err(RegionError::NoSuchMeal(req.sku));
        }
        if let Some(customer) = &req.customer_id {
            larder_shared::limits::customer_id(customer)
                .map_err(|e| RegionError::Invalid(e.to_string()))?;
            // Once per customer and sku: a customer cannot move an average alone.
            let in_group = batch
                .ratings
                .iter()
                .any(|(s, _, c, _)| *s == req.sku && c.as_deref() == Some(customer));
            let stored = self.store.rated(req.sku.as_str(), customer).map_err(|e| {
                error!(region = %self.region, error = %e, "reading ratings failed");
                RegionError::StoreRead(e.to_string())
            })?;
            if in_group || stored {
                return Err(RegionError::AlreadyRated {
                    customer: customer.clone(),
                    sku: req.sku,
                });
            }
        }
        let total = self.ratings.entry(req.sku.clone()).or_default();
        total.0 += i64::from(req.stars);
        total.1 += 1;
        let (sum, count) = *total;
        batch
            .ratings
            .push((req.sku.clone(), req.stars, req.customer_id, now));
        let average = average(sum, count);
        self.after_commit.push(EventKind::Rating {
            sku: req.sku.clone(),
            average,
            count,
        });
        Ok(Outcome::Rated {
            sku: req.sku,
            stars: req.stars,
            average,
            count,
        })
    }
}

/// A rating average, to two decimals.
pub fn average(sum: i64, count: u64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    (sum as f64 / count as f64 * 100.0).round() / 100.0
}
