//! The one clock of a process: every time the agent or the hub stamps, compares or waits on
//! is read here, so simulations and benchmarks can move it and no code reads wall time behind
//! its back.

use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The time the writer stamps records with and checks expiry against: the system clock, or
/// for simulations and benchmarks, the system clock moved by an adjustable offset (a simulated
/// year runs in minutes). The network side (tokens, retransmits) always uses the system clock.
///
/// Either way the time is trusted time ([`larder_shared::time`]): the later of that clock and
/// the hub's last signed time beacon plus the monotonic time since it arrived.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// The last beacon: the hub's time and when (monotonic) it arrived.
    beacon: Arc<std::sync::Mutex<Option<(i64, std::time::Instant)>>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The system clock plus `offset_ms` (milliseconds), which the caller may move at any time.
    pub fn offset(offset_ms: Arc<std::sync::atomic::AtomicI64>) -> Self {
        Self {
            offset_ms: Some(offset_ms),
            beacon: Arc::default(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.trusted().now_ms
    }

    /// This device's own clock (moved by the offset, if any), before the hub's beacons: the
    /// clock the firmware on the same board stamps its readings with.
    pub fn wall_ms(&self) -> i64 {
        system_ms()
            + self
                .offset_ms
                .as_ref()
                .map_or(0, |o| o.load(Ordering::Relaxed))
    }

    /// The trusted time with its source and bounds.
    pub fn trusted(&self) -> larder_shared::time::TrustedTime {
        let wall = self.wall_ms();
        let beacon = self
            .beacon
            .lock()
            .map(|b| b.map(|(hub_ms, at)| (hub_ms, at.elapsed().as_millis() as i64)))
            .unwrap_or(None);
        larder_shared::time::trusted_now(wall, beacon)
    }

    /// Takes a time beacon the hub signed (its envelope was verified). An older beacon than
    /// the last one changes nothing.
    pub fn observe_beacon(&self, hub_ms: i64) {
        if let Ok(mut b) = self.beacon.lock() {
            let newer = b.is_none_or(|(last, at)| {
                hub_ms
                    > last.saturating_add(at.elapsed().as_millis() as i64)
                        - larder_shared::time::BEACON_TRANSIT_MS_MAX
            });
            if newer {
                *b = Some((hub_ms, std::time::Instant::now()));
            }
        }
    }

    /// The system clock alone, neither offset nor corrected by beacons: the network side's
    /// time (presence stamps, retransmit timers, token ages), which peers compare with their
    /// own system clocks.
    pub fn network_ms(&self) -> i64 {
        system_ms()
    }
}

/// Milliseconds since the Unix epoch from the system clock: read only through [`Clock`].
fn system_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
