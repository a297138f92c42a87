//! Time the device trusts: the later of its own clock and the hub's last signed time beacon
//! plus the monotonic time elapsed since it arrived. A clock set back (a dead RTC battery, a
//! manual change) cannot make expired units sellable again; a clock running ahead only makes
//! units expire early, the safe side.

/// Allowance for a beacon's time in transit (the hub stamps it when it sends it).
pub const BEACON_TRANSIT_MS_MAX: i64 = 1_000;
/// Rate error assumed for the monotonic clock between beacons: 200 ppm (a cheap crystal).
pub const MONOTONIC_PPM: i64 = 200;

/// Where the trusted time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// The device's own clock (no beacon yet, or the clock is ahead of the beacon's).
    Wall,
    /// The last beacon plus monotonic time.
    Beacon,
}

/// The time a device trusts now, and how far behind the true time it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TrustedTime {
    pub now_ms: i64,
    pub source: TimeSource,
    /// How far the trusted time may be behind the hub's: the beacon's transit allowance plus
    /// the monotonic clock's error since it arrived. `None` before the first beacon.
    pub behind_bound_ms: Option<i64>,
    /// How far the device's own clock is ahead of the beacon's estimate (0 if behind).
    pub wall_ahead_ms: Option<i64>,
}

/// The trusted time from the wall clock and the last beacon: `(hub_ms, elapsed_ms)`, the
/// beacon's time and the monotonic milliseconds since it arrived.
pub fn trusted_now(wall_ms: i64, beacon: Option<(i64, i64)>) -> TrustedTime {
    match beacon {
        None => TrustedTime {
            now_ms: wall_ms,
            source: TimeSource::Wall,
            behind_bound_ms: None,
            wall_ahead_ms: None,
        },
        Some((hub_ms, elapsed_ms)) => {
            let estimate = hub_ms.saturating_add(elapsed_ms.max(0));
            let bound = BEACON_TRANSIT_MS_MAX + elapsed_ms.max(0) * MONOTONIC_PPM / 1_000_000;
            TrustedTime {
                now_ms: wall_ms.max(estimate),
                source: if wall_ms >= estimate {
                    TimeSource::Wall
                } else {
                    TimeSource::Beacon
                },
                behind_bound_ms: Some(bound),
                wall_ahead_ms: Some((wall_ms - estimate).max(0)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_of_the_wall_clock_and_the_beacon_wins() {
        let t = trusted_now(1_000, None);
        assert_eq!(
            (t.now_ms, t.source, t.behind_bound_ms),
            (1_000, TimeSource::Wall, None)
        );
        // A clock a day behind follows the beacon.
        let day = 86_400_000;
        let t = trusted_now(10 * day - day, Some((10 * day - 5_000, 5_000)));
        assert_eq!((t.now_ms, t.source), (10 * day, TimeSource::Beacon));
        assert_eq!(t.wall_ahead_ms, Some(0));
        // A clock ahead stays ahead: units expire early, never late.
        let t = trusted_now(10 * day + 60_000, Some((10 * day, 0)));
        assert_eq!((t.now_ms, t.source), (10 * day + 60_000, TimeSource::Wall));
        assert_eq!(t.wall_ahead_ms, Some(60_000));
        // The bound grows with the time since the beacon: 200 ppm of a day is 17.28 s.
        let t = trusted_now(0, Some((0, day)));
        assert_eq!(t.behind_bound_ms, Some(BEACON_TRANSIT_MS_MAX + 17_280));
    }
}
