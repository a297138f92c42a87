//! A fridge as the hub's config describes it: its site, stock thresholds, and what customers
//! see of it (where it is, when it is open).

use larder_shared::{FridgeId, SiteId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FridgeConfig {
    pub id: FridgeId,
    pub site: SiteId,
    /// Units per sku under which the fridge counts as low on stock.
    #[serde(default = "default_low_stock")]
    pub low_stock_units: u32,
    /// Par levels of this fridge by sku, where they differ from the region's default.
    #[serde(default)]
    pub par_levels: std::collections::BTreeMap<String, u32>,
    /// Where customers find it (free text: "Lobby, 2 Main St"), shown in the shop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// When customers can reach it, `HH:MM-HH:MM` in the region's time zone (may span
    /// midnight); always, when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opening_hours: Option<String>,
}

impl FridgeConfig {
    /// The opening hours as times of day, from and until.
    pub fn hours(&self) -> Result<Option<(jiff::civil::Time, jiff::civil::Time)>, String> {
        let Some(h) = &self.opening_hours else {
            return Ok(None);
        };
        let (from, until) = h
            .split_once('-')
            .ok_or_else(|| format!("{h:?} is not HH:MM-HH:MM"))?;
        let time = |t: &str| {
            t.trim()
                .parse::<jiff::civil::Time>()
                .map_err(|e| format!("{h:?} is not HH:MM-HH:MM: {e}"))
        };
        let (from, until) = (time(from)?, time(until)?);
        if from == until {
            return Err(format!("{h:?} opens and closes at once"));
        }
        Ok(Some((from, until)))
    }

    /// Whether the fridge is open at local time `t`.
    pub fn open_at(&self, t: jiff::civil::Time) -> bool {
        match self.hours() {
            Ok(Some((from, until))) if from < until => from <= t && t < until,
            Ok(Some((from, until))) => t >= from || t < until,
            _ => true,
        }
    }
}

fn default_low_stock() -> u32 {
    2
}

#[cfg(test)]
mod tests {
    use super::super::HubConfig;
    use super::*;

    #[test]
    fn opening_hours_may_span_midnight_and_must_be_times() {
        let t = |s: &str| s.parse::<jiff::civil::Time>().expect("time");
        let fridge: FridgeConfig = toml::from_str(
            "id = \"f\"\nsite = \"s\"\nopening_hours = \"22:00-06:30\"\nlocation = \"Gate 3\"\n",
        )
        .expect("parses");
        assert!(fridge.open_at(t("23:59")) && fridge.open_at(t("06:29")));
        assert!(!fridge.open_at(t("06:30")) && !fridge.open_at(t("12:00")));
        let day = FridgeConfig {
            opening_hours: Some("07:00-21:00".into()),
            ..fridge.clone()
        };
        assert!(day.open_at(t("07:00")) && !day.open_at(t("21:00")));
        let always = FridgeConfig {
            opening_hours: None,
            ..fridge
        };
        assert!(always.open_at(t("03:00")));
        let config: HubConfig = toml::from_str(
            "[[regions]]\nid = \"north\"\n[[regions.fridges]]\nid = \"f\"\nsite = \"s\"\nopening_hours = \"7-21\"\n",
        )
        .expect("parses");
        let problems = config.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.0.contains("regions.north.fridges.f.opening_hours")),
            "{problems:?}"
        );
    }
}
