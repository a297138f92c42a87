//! Subscriptions and the kitchen's plans: subscriber schedules and their occurrences, the
//! daily cut-off that makes the next day's occurrences into orders, the refill plan and the
//! prepare report. The plans are pure functions of stock counts, schedules and par levels.

use std::collections::{BTreeMap, BTreeSet};

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use larder_shared::FridgeId;
use larder_shared::domain::AppOrderLine;
use serde::{Deserialize, Serialize};

use crate::config::RegionConfig;

/// A subscriber's schedule: these meals at this fridge on these weekdays, from `start_date`
/// until `end_date` (inclusive) or until it is ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub subscription_id: String,
    pub customer_id: String,
    pub fridge_id: FridgeId,
    pub lines: Vec<AppOrderLine>,
    /// `mon` .. `sun`.
    pub weekdays: Vec<String>,
    pub start_date: Date,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_date: Option<Date>,
    pub created_at_ms: i64,
    /// When it was ended; occurrences not yet made into orders are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<i64>,
}

/// `mon` .. `sun` for a weekday.
pub fn weekday_name(d: Weekday) -> &'static str {
    match d {
        Weekday::Monday => "mon",
        Weekday::Tuesday => "tue",
        Weekday::Wednesday => "wed",
        Weekday::Thursday => "thu",
        Weekday::Friday => "fri",
        Weekday::Saturday => "sat",
        Weekday::Sunday => "sun",
    }
}

pub use larder_shared::limits::WEEKDAYS;

impl Subscription {
    /// Whether the schedule has an occurrence on `date` (ignoring skips).
    pub fn occurs_on(&self, date: Date) -> bool {
        date >= self.start_date
            && self.end_date.is_none_or(|end| date <= end)
            && self
                .weekdays
                .iter()
                .any(|w| w == weekday_name(date.weekday()))
    }

    /// The order an occurrence becomes.
    pub fn order_id(&self, date: Date) -> String {
        format!("{}-{date}", self.subscription_id)
    }
}

/// The region's clock rules: its time zone and the daily cut-off.
#[derive(Debug, Clone)]
pub struct Calendar {
    pub tz: TimeZone,
    pub cutoff: Time,
}

impl Calendar {
    pub fn of(region: &RegionConfig) -> Result<Self, String> {
        Ok(Self {
            tz: region.time_zone()?,
            cutoff: region.cutoff()?,
        })
    }

    /// The local date at `ms`.
    pub fn date(&self, ms: i64) -> Date {
        jiff::Timestamp::from_millisecond(ms)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(self.tz.clone())
            .date()
    }

    /// The last date whose occurrences are orders by `ms`: tomorrow once today's cut-off has
    /// passed, else today.
    pub fn generated_through(&self, ms: i64) -> Date {
        let z = jiff::Timestamp::from_millisecond(ms)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(self.tz.clone());
        if z.time() >= self.cutoff {
            z.date().tomorrow().unwrap_or(z.date())
        } else {
            z.date()
        }
    }

    /// The start of `date` (local midnight) in ms.
    pub fn start_of(&self, date: Date) -> i64 {
        date.to_zoned(self.tz.clone())
            .map(|z| z.timestamp().as_millisecond())
            .unwrap_or(0)
    }
}

/// Units of one sku at one fridge, as the units projection counts them now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StockCount {
    /// In the fridge and not expired (available or reserved).
    pub on_hand: u64,
    pub reserved: u64,
    /// On hand, but expiring before the next delivery.
    pub expiring: u64,
}

/// One row of the refill plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanRow {
    pub fridge_id: FridgeId,
    pub sku: String,
    pub par: u32,
    pub on_hand: u64,
    pub expiring: u64,
    pub reserved: u64,
    pub scheduled: u64,
    pub to_deliver: u64,
}

/// Subscription units scheduled for `date`, per fridge and sku.
pub fn scheduled_on(
    subs: &[Subscription],
    skipped: &BTreeSet<String>,
    date: Date,
) -> PerFridge<u64> {
    let mut out: BTreeMap<FridgeId, std::collections::HashMap<String, u64>> = BTreeMap::new();
    for s in subs {
        if s.ended_at_ms.is_some() || !s.occurs_on(date) || skipped.contains(&s.subscription_id) {
            continue;
        }
        for l in &s.lines {
            *out.entry(s.fridge_id.clone())
                .or_default()
                .entry(l.sku.to_string())
                .or_default() += u64::from(l.quantity);
        }
    }
    out.into_iter()
        .map(|(f, m)| (f, std::sync::Arc::new(m)))
        .collect()
}

/// Per fridge, per sku: counts of some kind.
pub type PerFridge<T> = BTreeMap<FridgeId, std::sync::Arc<std::collections::HashMap<String, T>>>;

/// The refill plan: for every fridge of the region and every sku of the catalog, the par
/// level, what is on hand, what expires before the next delivery, what is reserved, what
/// subscribers get, and what to deliver: enough to bring the free, lasting units up to par,
/// plus the subscribers' meals.
pub fn refill_plan(
    region: &RegionConfig,
    skus: &[String],
    stock: &PerFridge<StockCount>,
    scheduled: &PerFridge<u64>,
) -> Vec<PlanRow> {
    let mut rows = Vec::with_capacity(region.fridges.len() * skus.len());
    for f in &region.fridges {
        let (f_stock, f_scheduled) = (stock.get(&f.id), scheduled.get(&f.id));
        for sku in skus {
            let c = f_stock
                .and_then(|m| m.get(sku.as_str()))
                .copied()
                .unwrap_or_default();
            let scheduled = f_scheduled
                .and_then(|m| m.get(sku.as_str()))
                .copied()
                .unwrap_or(0);
            let par = f
                .par_levels
                .get(sku.as_str())
                .copied()
                .unwrap_or(region.par_level_default);
            let lasting_free = c
                .on_hand
                .saturating_sub(c.expiring)
                .saturating_sub(c.reserved);
            rows.push(PlanRow {
                fridge_id: f.id.clone(),
                sku: sku.clone(),
                par,
                on_hand: c.on_hand,
                expiring: c.expiring,
                reserved: c.reserved,
                scheduled,
                to_deliver: u64::from(par).saturating_sub(lasting_free) + scheduled,
            });
        }
    }
    rows
}

/// The prepare report: what the kitchen cooks for `date`, per sku and per fridge, split into
/// subscription meals and refill needs.
pub fn prepare_report(date: Date, plan: &[PlanRow]) -> serde_json::Value {
    let mut per_sku: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut per_fridge: BTreeMap<&FridgeId, Vec<serde_json::Value>> = BTreeMap::new();
    for r in plan.iter().filter(|r| r.to_deliver > 0) {
        let refill = r.to_deliver - r.scheduled;
        let e = per_sku.entry(r.sku.as_str()).or_default();
        e.0 += r.scheduled;
        e.1 += refill;
        per_fridge
            .entry(&r.fridge_id)
            .or_default()
            .push(serde_json::json!({
                "sku": r.sku, "subscriptions": r.scheduled, "refill": refill, "total": r.to_deliver,
            }));
    }
    serde_json::json!({
        "date": date.to_string(),
        "skus": per_sku.iter().map(|(sku, (subs, refill))| serde_json::json!({
            "sku": sku, "subscriptions": subs, "refill": refill, "total": subs + refill,
        })).collect::<Vec<_>>(),
        "fridges": per_fridge.into_iter().map(|(f, skus)| serde_json::json!({
            "fridge_id": f, "skus": skus,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use larder_shared::Sku;

    fn sub(weekdays: &[&str], start: &str, end: Option<&str>) -> Subscription {
        Subscription {
            subscription_id: "sub-1".into(),
            customer_id: "c".into(),
            fridge_id: FridgeId::new("f1").expect("id"),
            lines: vec![AppOrderLine {
                sku: Sku::new("lasagna").expect("sku"),
                quantity: 2,
            }],
            weekdays: weekdays.iter().map(|w| w.to_string()).collect(),
            start_date: start.parse().expect("date"),
            end_date: end.map(|e| e.parse().expect("date")),
            created_at_ms: 0,
            ended_at_ms: None,
        }
    }

    #[test]
    fn occurrences_follow_weekdays_and_dates() {
        let s = sub(&["mon", "thu"], "2026-11-23", Some("2026-11-30"));
        let d = |t: &str| t.parse::<Date>().expect("date");
        assert!(s.occurs_on(d("2026-11-23"))); // a Monday
        assert!(!s.occurs_on(d("2026-11-24")));
        assert!(s.occurs_on(d("2026-11-26")));
        assert!(s.occurs_on(d("2026-11-30")));
        assert!(!s.occurs_on(d("2026-12-03")), "after the end");
        assert!(!s.occurs_on(d("2026-11-16")), "before the start");
    }

    #[test]
    fn the_cut_off_moves_generation_to_the_next_day() {
        let cal = Calendar {
            tz: TimeZone::UTC,
            cutoff: "20:00".parse().expect("time"),
        };
        let at = |t: &str| t.parse::<jiff::Timestamp>().expect("ts").as_millisecond();
        assert_eq!(
            cal.generated_through(at("2026-11-23T19:59:59Z"))
                .to_string(),
            "2026-11-23"
        );
        assert_eq!(
            cal.generated_through(at("2026-11-23T20:00:00Z"))
                .to_string(),
            "2026-11-24"
        );
    }

    #[test]
    fn the_plan_fills_up_to_par_and_adds_the_subscribers_meals() {
        let region: RegionConfig = toml::from_str(
            r#"id = "r"
par_level_default = 5
[[fridges]]
id = "f1"
site = "s1"
par_levels = { soup = 2 }
"#,
        )
        .expect("region");
        let f1 = FridgeId::new("f1").expect("id");
        let mut stock: PerFridge<StockCount> = BTreeMap::new();
        stock.insert(
            f1.clone(),
            std::sync::Arc::new(
                [(
                    "lasagna".to_string(),
                    StockCount {
                        on_hand: 4,
                        reserved: 1,
                        expiring: 1,
                    },
                )]
                .into(),
            ),
        );
        let mut scheduled: PerFridge<u64> = BTreeMap::new();
        scheduled.insert(
            f1.clone(),
            std::sync::Arc::new([("lasagna".to_string(), 2)].into()),
        );
        let plan = refill_plan(
            &region,
            &["lasagna".into(), "soup".into()],
            &stock,
            &scheduled,
        );
        assert_eq!(plan[0].to_deliver, 5 - 2 + 2);
        assert_eq!((plan[1].par, plan[1].to_deliver), (2, 2));
        let report = prepare_report("2026-11-24".parse().expect("date"), &plan);
        assert_eq!(report["skus"][0]["subscriptions"], 2);
        assert_eq!(report["skus"][0]["refill"], 3);
        assert_eq!(report["skus"][1]["total"], 2);
    }
}
