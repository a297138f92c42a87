//! Payment providers: the one outside party Larder simulates. The hub captures app orders after
//! their grace window, and a POS captures the card payments it took offline, through
//! [`PaymentProvider`]; [`SimulatedProvider`] answers deterministically from a seed.

use sha2::{Digest, Sha256};

use crate::ids::OrderId;

/// What a provider answered to a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureResult {
    Captured,
    Refused,
    /// No answer: the caller times the payment out.
    NoAnswer,
    /// Captured now, reported failed later (a chargeback, a card that bounced).
    CapturedThenFails,
}

/// A payment provider.
pub trait PaymentProvider: Send + Sync + std::fmt::Debug {
    fn capture(&self, order: &OrderId, amount_minor: i64, currency: &str) -> CaptureResult;
}

/// Rates (per mille) of each outcome of [`SimulatedProvider`]; the rest are captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedRates {
    pub refuse_per_mille: u32,
    pub no_answer_per_mille: u32,
    pub fail_later_per_mille: u32,
}

impl SimulatedRates {
    /// The config problem with these rates, if any: together they may not pass 1000 per mille
    /// (summed wide, so no value overflows).
    pub fn problem(&self) -> Option<&'static str> {
        let total: u64 = [
            self.refuse_per_mille,
            self.no_answer_per_mille,
            self.fail_later_per_mille,
        ]
        .iter()
        .map(|&r| u64::from(r))
        .sum();
        (total > 1000).then_some("the rates add up to more than 1000 per mille")
    }
}

/// A deterministic provider: the outcome of an order is a function of the seed and the order
/// id. Order ids ending in `-refuse`, `-noanswer` or `-faillater` get that outcome whatever the
/// rates (for tests and demos).
#[derive(Debug, Clone)]
pub struct SimulatedProvider {
    seed: u64,
    rates: SimulatedRates,
}

impl SimulatedProvider {
    pub fn new(seed: u64, rates: SimulatedRates) -> Self {
        Self { seed, rates }
    }
}

impl PaymentProvider for SimulatedProvider {
    fn capture(&self, order: &OrderId, _amount_minor: i64, _currency: &str) -> CaptureResult {
        let id = order.as_str();
        if id.ends_with("-refuse") {
            return CaptureResult::Refused;
        }
        if id.ends_with("-noanswer") {
            return CaptureResult::NoAnswer;
        }
        if id.ends_with("-faillater") {
            return CaptureResult::CapturedThenFails;
        }
        let digest = Sha256::new()
            .chain_update(self.seed.to_le_bytes())
            .chain_update(id.as_bytes())
            .finalize();
        let roll = u32::from(u16::from_le_bytes([digest[0], digest[1]])) % 1000;
        let r = self.rates;
        if roll < r.refuse_per_mille {
            CaptureResult::Refused
        } else if roll < r.refuse_per_mille + r.no_answer_per_mille {
            CaptureResult::NoAnswer
        } else if roll < r.refuse_per_mille + r.no_answer_per_mille + r.fail_later_per_mille {
            CaptureResult::CapturedThenFails
        } else {
            CaptureResult::Captured
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_rates_and_the_seed() {
        let p = SimulatedProvider::new(
            7,
            SimulatedRates {
                refuse_per_mille: 100,
                no_answer_per_mille: 100,
                fail_later_per_mille: 100,
            },
        );
        let outcomes: Vec<CaptureResult> = (0..2000)
            .map(|n| p.capture(&OrderId::new(format!("o-{n}")).expect("id"), 100, "EUR"))
            .collect();
        let refused = outcomes
            .iter()
            .filter(|o| **o == CaptureResult::Refused)
            .count();
        assert!((150..250).contains(&refused), "{refused}");
        let again: Vec<CaptureResult> = (0..2000)
            .map(|n| p.capture(&OrderId::new(format!("o-{n}")).expect("id"), 100, "EUR"))
            .collect();
        assert_eq!(outcomes, again);
        assert_eq!(
            p.capture(&OrderId::new("x-refuse").expect("id"), 1, "EUR"),
            CaptureResult::Refused
        );
    }
}
