//! Reliable, idempotent streams over an unreliable transport: the IO-free core of sync.
//!
//! Message flow, the same in both directions (device outbox → hub, hub downlink → device):
//!
//! ```text
//! sender                                   receiver
//!   poll_send(head) -> window (after, n)
//!   shell reads entries, publishes  ──Changes{after, up_to, entries}──▶ on_batch:
//!   on_sent(up_to, bytes)                                              Gap | Duplicate | Apply
//!                                                                      shell commits, then
//!   on_ack(up_to, gap)              ◀──────────Ack{up_to, gap}──────── on_committed(up_to)
//!   shell forgets entries <= up_to
//! ```
//!
//! The receiver keeps one number per stream (the high-water mark `hwm`) and applies a batch only
//! if it starts at or before `hwm`, so nothing is skipped; entries at or below `hwm` are ignored,
//! so duplicates change nothing. The sender rewinds to the last acknowledged position on
//! reconnect, on a `gap` reply and when acknowledgements stall (go-back-N). The entries and
//! bytes in flight and the size of a batch are bounded.
//!
//! `SeqAllocator` hands out envelope sequence numbers from blocks that the shell persists before
//! the first number of a block is signed, so numbers strictly increase across crashes.

use crate::envelope::{Ack, Batch, Entry, EntryKind};

/// Limits of a stream sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderLimits {
    /// Entries per batch.
    pub batch_entries_max: u64,
    /// Encoded bytes of a batch's entries.
    pub batch_bytes_max: usize,
    /// Entries sent but not acknowledged.
    pub inflight_entries_max: u64,
    /// Bytes of the batches sent but not acknowledged (as the shell counts them: the sealed
    /// envelopes). A batch goes out while fewer are in flight, so the last one may pass it.
    pub inflight_bytes_max: usize,
    /// Rewind when nothing was acknowledged for this long while entries are in flight.
    pub retransmit_after_ms: i64,
}

impl Default for SenderLimits {
    fn default() -> Self {
        Self {
            batch_entries_max: 512,
            batch_bytes_max: 192 * 1024,
            inflight_entries_max: 4096,
            inflight_bytes_max: 1 << 20,
            retransmit_after_ms: 5_000,
        }
    }
}

/// What the sender wants the shell to send: the stream's entries after `after`, at most
/// `entries_max` of them and at most `bytes_max` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow {
    pub after: u64,
    pub entries_max: u64,
    pub bytes_max: usize,
    /// The most one entry may take (a batch's whole budget): a larger one is withheld.
    pub entry_bytes_max: usize,
}

/// The sending half of a stream.
#[derive(Debug, Clone)]
pub struct StreamSender {
    limits: SenderLimits,
    acked: u64,
    sent_up_to: u64,
    connected: bool,
    last_progress_ms: i64,
    /// `(up_to, bytes)` of each batch sent since the last rewind and not yet acknowledged.
    in_flight: std::collections::VecDeque<(u64, usize)>,
}

impl StreamSender {
    /// A sender whose receiver has durably acknowledged everything up to `acked`.
    pub fn new(acked: u64, limits: SenderLimits) -> Self {
        Self {
            limits,
            acked,
            sent_up_to: acked,
            connected: false,
            last_progress_ms: 0,
            in_flight: std::collections::VecDeque::new(),
        }
    }

    /// Bytes of the batches in flight.
    pub fn inflight_bytes(&self) -> usize {
        self.in_flight.iter().map(|(_, bytes)| bytes).sum()
    }

    /// Send again from what the receiver has.
    fn rewind(&mut self) {
        self.sent_up_to = self.acked;
        self.in_flight.clear();
    }

    /// What the sender relies on: nothing is acknowledged that was not sent, and the batches in
    /// flight cover, in order, what lies between the two.
    fn check(&self) {
        assert!(
            self.acked <= self.sent_up_to,
            "acknowledged {} past what was sent, {}",
            self.acked,
            self.sent_up_to
        );
        debug_assert!(
            self.in_flight
                .iter()
                .try_fold(self.acked, |after, (up_to, _)| (*up_to > after
                    && *up_to <= self.sent_up_to)
                    .then_some(*up_to))
                .is_some(),
            "batches in flight out of order: {:?} after {}",
            self.in_flight,
            self.acked
        );
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn sent_up_to(&self) -> u64 {
        self.sent_up_to
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The link is up: start again from what the receiver has.
    pub fn on_connected(&mut self, now_ms: i64) {
        self.connected = true;
        self.rewind();
        self.last_progress_ms = now_ms;
    }

    /// The receiver's store was restored and holds the stream only up to `acked` (below what
    /// it acknowledged before): send again from there.
    pub fn restart_at(&mut self, acked: u64, now_ms: i64) {
        self.acked = self.acked.min(acked);
        self.rewind();
        self.last_progress_ms = now_ms;
    }

    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.rewind();
    }

    /// The next window to send, if the link is up, there is something past what was sent
    /// (`head` is the stream's last seq) and the in-flight limit allows.
    pub fn poll_send(&self, head: u64) -> Option<SendWindow> {
        if !self.connected || self.sent_up_to >= head {
            return None;
        }
        let inflight = self.sent_up_to.saturating_sub(self.acked);
        let inflight_bytes = self.inflight_bytes();
        if inflight >= self.limits.inflight_entries_max
            || inflight_bytes >= self.limits.inflight_bytes_max
        {
            return None;
        }
        Some(SendWindow {
            after: self.sent_up_to,
            entries_max: self
                .limits
                .batch_entries_max
                .min(self.limits.inflight_entries_max - inflight),
            bytes_max: self
                .limits
                .batch_bytes_max
                .min(self.limits.inflight_bytes_max - inflight_bytes),
            entry_bytes_max: self.limits.batch_bytes_max,
        })
    }

    /// The shell published a batch covering up to `up_to`, `bytes` long.
    pub fn on_sent(&mut self, up_to: u64, bytes: usize) {
        if up_to > self.sent_up_to {
            self.in_flight.push_back((up_to, bytes));
            self.sent_up_to = up_to;
        }
        self.check();
    }

    /// An acknowledgement arrived. Returns the new acknowledged position if it moved, so the
    /// shell can forget entries up to it.
    pub fn on_ack(&mut self, ack: Ack, now_ms: i64) -> Option<u64> {
        let moved = if ack.up_to > self.acked {
            self.acked = ack.up_to;
            self.sent_up_to = self.sent_up_to.max(ack.up_to);
            while self
                .in_flight
                .front()
                .is_some_and(|(up_to, _)| *up_to <= ack.up_to)
            {
                self.in_flight.pop_front();
            }
            self.last_progress_ms = now_ms;
            Some(ack.up_to)
        } else {
            None
        };
        if ack.gap {
            self.rewind();
            self.last_progress_ms = now_ms;
        }
        self.check();
        moved
    }

    /// Time passes: rewind if acknowledgements stalled while entries are in flight.
    ///
    /// `now_ms` may come from a wall clock that steps backwards (a device's clock corrected
    /// by a day): a time before the last progress restarts the wait from now, so a step back
    /// delays a retransmission by one interval at most instead of by the size of the step.
    pub fn tick(&mut self, now_ms: i64) {
        if now_ms < self.last_progress_ms {
            self.last_progress_ms = now_ms;
        }
        if self.connected
            && self.sent_up_to > self.acked
            && now_ms - self.last_progress_ms >= self.limits.retransmit_after_ms
        {
            self.rewind();
            self.last_progress_ms = now_ms;
        }
    }
}

/// Builds a batch from the entries after `window.after`, as read with a limit of
/// `window.entries_max`, stopping at the window's byte limit. `stream_head` is the stream's
/// last seq when `entries` were read. Only when the read returned fewer entries than its limit
/// and all of them fit does the batch claim the whole range up to `stream_head` (a stream may
/// skip numbers); otherwise it ends at its last entry, so nothing unsent is ever covered.
///
/// An entry larger than a whole batch may carry (`window.entry_bytes_max`) goes as its
/// [`withheld`](Entry::withheld) stand-in: it could never be sent, and resending it for ever
/// would stop every entry behind it. The shell counts them (`EntryKind::Withheld`) and alerts.
pub fn build_batch(window: SendWindow, entries: Vec<Entry>, stream_head: u64) -> Option<Batch> {
    let mut taken = Vec::new();
    let mut bytes = 0usize;
    let mut complete = (entries.len() as u64) < window.entries_max;
    for entry in entries {
        // Only a ledger change is ever withheld; an epoch's start is sized to fit when it is
        // made (the hub does not compact a ledger whose start would not).
        let entry = if entry.kind == EntryKind::Change
            && entry.encoded_len_max() > window.entry_bytes_max
        {
            entry.withheld()
        } else {
            entry
        };
        let len = entry.encoded_len_max();
        debug_assert!(
            entry.kind != EntryKind::Change || len <= window.entry_bytes_max,
            "a change past the message limit is never sent"
        );
        if taken.len() as u64 >= window.entries_max
            || (!taken.is_empty() && bytes + len > window.bytes_max)
        {
            complete = false;
            break;
        }
        bytes += len;
        taken.push(entry);
    }
    let up_to = if complete {
        stream_head.max(taken.last().map_or(window.after, |e| e.seq))
    } else {
        taken.last().map_or(window.after, |e| e.seq)
    };
    (up_to > window.after).then_some(Batch::new(window.after, up_to, taken))
}

/// What a receiver makes of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// Apply these entries (all new), commit, then call `on_committed(up_to)` and acknowledge.
    Apply { entries: Vec<Entry>, up_to: u64 },
    /// Nothing new: acknowledge `hwm` again.
    Duplicate,
    /// The batch starts past what we have: ask for a resend from `hwm`.
    Gap,
    /// Entries out of order or outside the batch's range: refuse.
    Malformed,
}

/// The receiving half of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReceiver {
    hwm: u64,
}

impl StreamReceiver {
    /// A receiver that has durably applied everything up to `hwm`.
    pub fn new(hwm: u64) -> Self {
        Self { hwm }
    }

    pub fn hwm(&self) -> u64 {
        self.hwm
    }

    pub fn on_batch(&self, batch: Batch) -> Receipt {
        let mut previous = batch.after;
        for entry in &batch.entries {
            if entry.seq <= previous || entry.seq > batch.up_to {
                return Receipt::Malformed;
            }
            previous = entry.seq;
        }
        if batch.up_to < batch.after {
            return Receipt::Malformed;
        }
        if batch.after > self.hwm {
            return Receipt::Gap;
        }
        if batch.up_to <= self.hwm {
            return Receipt::Duplicate;
        }
        let hwm = self.hwm;
        Receipt::Apply {
            entries: batch.entries.into_iter().filter(|e| e.seq > hwm).collect(),
            up_to: batch.up_to,
        }
    }

    /// The applied entries are durable.
    pub fn on_committed(&mut self, up_to: u64) {
        self.hwm = self.hwm.max(up_to);
    }

    /// The acknowledgement to send now.
    pub fn ack(&self, gap: bool) -> Ack {
        Ack::new(self.hwm, gap)
    }
}

/// Hands out envelope sequence numbers from persisted blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqAllocator {
    next: u64,
    reserved_up_to: u64,
    block: u64,
}

impl SeqAllocator {
    /// Resume after a restart: numbers up to `persisted_reservation` may have been used.
    pub fn resume(persisted_reservation: u64, block: u64) -> Self {
        Self {
            next: persisted_reservation + 1,
            reserved_up_to: persisted_reservation,
            block: block.max(1),
        }
    }

    /// The next number, and a new reservation the shell must persist before signing with it.
    pub fn allocate(&mut self) -> (u64, Option<u64>) {
        let seq = self.next;
        self.next += 1;
        if seq > self.reserved_up_to {
            self.reserved_up_to = seq + self.block - 1;
            (seq, Some(self.reserved_up_to))
        } else {
            (seq, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::FridgeId;
    use proptest::prelude::*;

    fn entry(seq: u64) -> Entry {
        Entry::change(seq, FridgeId::new("f").expect("id"), 0, vec![seq as u8])
    }

    fn batch(after: u64, seqs: &[u64], up_to: u64) -> Batch {
        Batch::new(after, up_to, seqs.iter().copied().map(entry).collect())
    }

    #[test]
    fn receiver_table() {
        let r = StreamReceiver::new(5);
        let cases: Vec<(Batch, Receipt)> = vec![
            (
                batch(5, &[6, 7], 7),
                Receipt::Apply {
                    entries: vec![entry(6), entry(7)],
                    up_to: 7,
                },
            ),
            (
                batch(3, &[4, 5, 6], 6),
                Receipt::Apply {
                    entries: vec![entry(6)],
                    up_to: 6,
                },
            ),
            (batch(2, &[3, 4], 4), Receipt::Duplicate),
            (batch(6, &[7], 7), Receipt::Gap),
            (batch(5, &[7, 6], 7), Receipt::Malformed),
            (batch(5, &[5], 7), Receipt::Malformed),
            (batch(5, &[9], 8), Receipt::Malformed),
            (
                batch(5, &[], 9),
                Receipt::Apply {
                    entries: vec![],
                    up_to: 9,
                },
            ),
        ];
        for (i, (b, want)) in cases.into_iter().enumerate() {
            assert_eq!(r.on_batch(b), want, "case {i}");
        }
    }

    #[test]
    fn sender_windows_and_rewinds() {
        let limits = SenderLimits {
            batch_entries_max: 10,
            batch_bytes_max: 1 << 20,
            inflight_entries_max: 25,
            inflight_bytes_max: 1 << 20,
            retransmit_after_ms: 100,
        };
        let mut s = StreamSender::new(0, limits);
        assert_eq!(s.poll_send(50), None, "nothing sent while offline");
        s.on_connected(0);
        let w = s.poll_send(50).expect("window");
        assert_eq!((w.after, w.entries_max), (0, 10));
        s.on_sent(10, 100);
        s.on_sent(20, 100);
        let w = s.poll_send(50).expect("window");
        assert_eq!((w.after, w.entries_max), (20, 5), "in-flight cap");
        s.on_sent(25, 100);
        assert_eq!(s.poll_send(50), None, "at the in-flight cap");
        assert_eq!(s.on_ack(Ack::new(10, false), 10), Some(10));
        assert_eq!(s.on_ack(Ack::new(5, false), 11), None, "old ack");
        s.tick(50);
        assert_eq!(s.sent_up_to(), 25, "not stalled yet");
        s.tick(111);
        assert_eq!(s.sent_up_to(), 10, "stalled: rewound");
        s.on_sent(25, 100);
        s.on_ack(Ack::new(12, true), 120);
        assert_eq!(s.sent_up_to(), 12, "gap: rewound to the ack");
        s.on_disconnected();
        assert_eq!(s.poll_send(50), None);
    }

    #[test]
    fn the_bytes_in_flight_are_capped() {
        let limits = SenderLimits {
            batch_entries_max: 10,
            batch_bytes_max: 1000,
            inflight_entries_max: 1000,
            inflight_bytes_max: 2500,
            retransmit_after_ms: 100,
        };
        let mut s = StreamSender::new(0, limits);
        s.on_connected(0);
        assert_eq!(s.poll_send(100).map(|w| w.bytes_max), Some(1000));
        s.on_sent(10, 1000);
        s.on_sent(20, 1000);
        assert_eq!(
            s.poll_send(100).map(|w| w.bytes_max),
            Some(500),
            "what is left under the cap"
        );
        s.on_sent(30, 900);
        assert_eq!(s.poll_send(100), None, "past the cap");
        s.on_ack(Ack::new(10, false), 1);
        assert_eq!(s.inflight_bytes(), 1900);
        assert_eq!(
            s.poll_send(100).map(|w| (w.after, w.bytes_max)),
            Some((30, 600))
        );
        s.on_sent(35, 600);
        s.on_sent(30, 600);
        assert_eq!(
            s.inflight_bytes(),
            2500,
            "a batch already counted is not again"
        );
        s.tick(200);
        assert_eq!(s.inflight_bytes(), 0, "stalled: rewound");
        assert_eq!(
            s.poll_send(100).map(|w| (w.after, w.bytes_max)),
            Some((10, 1000))
        );
    }

    /// Found by the protocol simulation: a device clock stepped back by an hour stopped
    /// retransmissions for that hour, since the wait was measured from a time now in the future.
    #[test]
    fn a_clock_stepped_back_delays_a_retransmission_by_one_interval_at_most() {
        let limits = SenderLimits {
            retransmit_after_ms: 100,
            ..SenderLimits::default()
        };
        let mut s = StreamSender::new(0, limits);
        s.on_connected(1_000_000);
        s.on_sent(5, 100);
        // The clock steps back an hour.
        let back = 1_000_000 - 3_600_000;
        s.tick(back);
        assert_eq!(s.sent_up_to(), 5, "the wait restarts from the new time");
        s.tick(back + 99);
        assert_eq!(s.sent_up_to(), 5);
        s.tick(back + 100);
        assert_eq!(s.sent_up_to(), 0, "one interval after the step: rewound");
    }

    #[test]
    fn build_batch_respects_limits_and_covers_skipped_numbers() {
        let w = SendWindow {
            after: 3,
            entries_max: 2,
            bytes_max: 1 << 20,
            entry_bytes_max: 1 << 20,
        };
        let b = build_batch(w, vec![entry(5), entry(9), entry(12)], 20).expect("batch");
        assert_eq!((b.after, b.up_to, b.entries.len()), (3, 9, 2));
        let w = SendWindow {
            after: 3,
            entries_max: 10,
            bytes_max: 1 << 20,
            entry_bytes_max: 1 << 20,
        };
        let b = build_batch(w, vec![entry(5)], 20).expect("batch");
        assert_eq!(b.up_to, 20, "complete read covers to the head");
        let w = SendWindow {
            after: 3,
            entries_max: 2,
            bytes_max: 1 << 20,
            entry_bytes_max: 1 << 20,
        };
        let b = build_batch(w, vec![entry(4), entry(5)], 20).expect("batch");
        assert_eq!(
            b.up_to, 5,
            "a read cut by its limit may have more: stop at its last entry"
        );
        let w = SendWindow {
            after: 3,
            entries_max: 10,
            bytes_max: 1,
            entry_bytes_max: 1 << 20,
        };
        let b = build_batch(w, vec![entry(5), entry(6)], 20).expect("batch");
        assert_eq!(b.entries.len(), 1, "one entry always fits");
        assert_eq!(build_batch(w, vec![], 3), None);
    }

    #[test]
    fn an_entry_past_the_message_limit_is_withheld_and_the_ones_behind_it_go() {
        let w = SendWindow {
            after: 3,
            entries_max: 10,
            bytes_max: 1 << 20,
            entry_bytes_max: 4096,
        };
        let big = Entry::change(5, FridgeId::new("f").expect("id"), 0, vec![7; 8192]);
        let digest = crate::audit::change_digest(&big.change);
        let b = build_batch(w, vec![entry(4), big, entry(6)], 6).expect("batch");
        assert_eq!((b.after, b.up_to, b.entries.len()), (3, 6, 3));
        assert_eq!(b.entries[0], entry(4));
        assert_eq!(b.entries[1].kind, EntryKind::Withheld);
        assert_eq!(b.entries[1].change, digest.to_vec(), "its digest stands in");
        assert_eq!(
            b.entries[1].change_digest(),
            Some(digest),
            "the chain goes on"
        );
        assert_eq!(b.entries[2], entry(6));
        assert!(b.entries.iter().all(|e| e.encoded_len_max() <= 4096));
    }

    #[test]
    fn seq_allocator_never_reuses_after_restart() {
        let mut a = SeqAllocator::resume(0, 4);
        assert_eq!(a.allocate(), (1, Some(4)));
        assert_eq!(a.allocate(), (2, None));
        // Crash after persisting 4: resume hands out 5 onwards.
        let mut b = SeqAllocator::resume(4, 4);
        assert_eq!(b.allocate(), (5, Some(8)));
    }

    proptest! {
        /// A sender and receiver over a channel that drops, duplicates and reorders deliver
        /// every entry exactly once, in order, and the sender ends fully acknowledged.
        #[test]
        fn lossy_link_delivers_everything_once(seed in any::<u64>(), head in 1u64..200) {
            let mut rng = seed | 1;
            let mut next = move || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let limits = SenderLimits { batch_entries_max: 7, batch_bytes_max: 1 << 20, inflight_entries_max: 20, inflight_bytes_max: 1 << 20, retransmit_after_ms: 10 };
            let mut sender = StreamSender::new(0, limits);
            let mut receiver = StreamReceiver::new(0);
            let mut applied = Vec::new();
            let mut to_receiver: Vec<Batch> = Vec::new();
            let mut to_sender: Vec<Ack> = Vec::new();
            sender.on_connected(0);
            for now in 0..20_000i64 {
                if sender.acked() == head { break; }
                sender.tick(now);
                if let Some(w) = sender.poll_send(head) {
                    // Read as the shells do: with a limit, from a stream that skips numbers.
                    let entries = (w.after + 1..=head)
                        .filter(|s| s % 3 != 0)
                        .take(w.entries_max as usize)
                        .map(entry)
                        .collect();
                    if let Some(b) = build_batch(w, entries, head) {
                        sender.on_sent(b.up_to, 100);
                        let copies = 1 + next() % 3;
                        for _ in 0..copies { if next() % 4 != 0 { to_receiver.push(b.clone()); } }
                    }
                }
                if !to_receiver.is_empty() && next() % 2 == 0 {
                    let i = (next() as usize) % to_receiver.len();
                    let b = to_receiver.swap_remove(i);
                    let gap = match receiver.on_batch(b) {
                        Receipt::Apply { entries, up_to } => {
                            applied.extend(entries.iter().map(|e| e.seq));
                            receiver.on_committed(up_to);
                            false
                        }
                        Receipt::Gap => true,
                        Receipt::Duplicate => false,
                        Receipt::Malformed => panic!("honest batch refused"),
                    };
                    if next() % 4 != 0 { to_sender.push(receiver.ack(gap)); }
                }
                if !to_sender.is_empty() && next() % 2 == 0 {
                    let i = (next() as usize) % to_sender.len();
                    let a = to_sender.swap_remove(i);
                    sender.on_ack(a, now);
                }
            }
            prop_assert_eq!(sender.acked(), head, "seed {} did not finish", seed);
            prop_assert_eq!(applied, (1..=head).filter(|s| s % 3 != 0).collect::<Vec<_>>());
        }
    }
}
