//! The region's committer thread, which commits a group's batch while the writer loads the next.
//!
//! Ingest and bulk import keep the writer busy with two kinds of work per group: merging the
//! envelopes or rows into the fridges' ledgers (in memory) and writing the batch to SQLite,
//! which ends in an fsync. The committer does the second on its own thread and connection, so
//! the writer can load group N+1 while group N is written. Once a batch is committed
//! (`synchronous=FULL`), the committer answers its requests (a device's acknowledgement among
//! them), publishes its events and raises the downlink head, in commit order.
//!
//! The writer keeps these rules (see `RegionWriter::process`):
//! - Only groups of uplinks and import batches are loaded while a batch is in flight, and only
//!   a batch of changes, audit links, device progress and projections is handed over: nothing
//!   that changes which keys, devices or requests the next group's checks depend on.
//! - While loading, the device rows it reads carry the progress of the batch in flight, so
//!   replay protection and stream positions stay exact across the uncommitted batch.
//! - It *settles* (waits for the batch in flight) before it commits anything itself, reloads its
//!   ledgers, or runs any other command; so the two connections never write at once.
//! - If the batch in flight fails to commit, the writer reloads its ledgers from the store and
//!   refuses the group it loaded on top, which was built on what was never stored.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use larder_shared::RegionId;
use tokio::sync::watch;
use tracing::error;

use super::{Pending, RegionError, answer, raise_head};
use crate::events::{EventKind, Events};
use crate::metrics::HubMetrics;
use crate::store::{RegionBatch, RegionStore, StoreError};

/// A batch to commit, with what waits on it.
pub(super) struct Job {
    pub batch: RegionBatch,
    pub pending: Vec<Pending>,
    pub events: Vec<EventKind>,
}

/// What the committer shares with the writer.
pub(super) struct Outlets {
    pub region: RegionId,
    pub head_tx: Arc<watch::Sender<u64>>,
    pub events: Events,
    pub metrics: Arc<HubMetrics>,
}

/// How a batch's commit ended: the change table's head after it (if the batch had changes and
/// the head could be read), or why it failed.
pub(super) type Settled = Result<Option<u64>, String>;

/// The writer's handle on its committer: at most one batch in flight.
#[derive(Debug)]
pub(super) struct Committer {
    jobs: Option<mpsc::Sender<Box<Job>>>,
    done: mpsc::Receiver<Settled>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("changes", &self.batch.changes.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts a committer on a connection of its own to `store`'s file.
    pub(super) fn start(store: RegionStore, outlets: Outlets) -> Result<Self, StoreError> {
        let (jobs, job_rx) = mpsc::channel::<Box<Job>>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("commit-{}", outlets.region))
            .spawn(move || run(store, outlets, job_rx, done_tx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the committer: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            in_flight: false,
            thread: Some(thread),
        })
    }

    /// Hands over a batch; the caller has settled the one before.
    pub(super) fn commit(&mut self, job: Job) -> Result<(), String> {
        debug_assert!(!self.in_flight);
        let Some(jobs) = self.jobs.as_ref() else {
            answer(job.pending, Err(gone()));
            return Err("the committer has stopped".into());
        };
        if let Err(mpsc::SendError(job)) = jobs.send(Box::new(job)) {
            answer(job.pending, Err(gone()));
            return Err("the committer has stopped".into());
        }
        self.in_flight = true;
        Ok(())
    }

    /// Waits for the batch in flight, if any: `Ok` once it is committed (see [`Settled`]),
    /// `Err` if its commit failed (its requests were answered with the error).
    pub(super) fn settle(&mut self) -> Settled {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(None);
        }
        self.done
            .recv()
            .unwrap_or_else(|_| Err("the committer has stopped".into()))
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        let _ = self.settle();
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn gone() -> RegionError {
    RegionError::Storage("the region's committer has stopped".into())
}

fn run(
    mut store: RegionStore,
    outlets: Outlets,
    jobs: mpsc::Receiver<Box<Job>>,
    done: mpsc::Sender<Settled>,
) {
    let region = vec![("region", outlets.region.to_string())];
    for job in jobs {
        let started = std::time::Instant::now();
        let result = store.commit(&job.batch);
        outlets
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let settled = match result {
            Ok(()) => {
                let mut head = None;
                if !job.batch.changes.is_empty() {
                    outlets
                        .metrics
                        .changes_merged
                        .get_or_create(&region)
                        .inc_by(job.batch.changes.len() as u64);
                    match store.head() {
                        Ok(h) => {
                            raise_head(&outlets.head_tx, h);
                            head = Some(h);
                        }
                        Err(e) => error!(error = %e, "reading the change head failed"),
                    }
                }
                for kind in job.events {
                    outlets.events.publish(kind);
                }
                answer(job.pending, Ok(()));
                Ok(head)
            }
            Err(e) => {
                error!(region = %outlets.region, error = %e, "region commit failed; batch refused");
                outlets.metrics.commit_failures.inc();
                answer(job.pending, Err(RegionError::Storage(e.to_string())));
                Err(e.to_string())
            }
        };
        if done.send(settled).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use larder_shared::envelope::Ack;
    use larder_shared::{RegionId, SecretKey, UnitId};
    use tokio::sync::oneshot;

    use crate::region::testing::{Loader, fridge, record, writer};
    use crate::region::{GroupDevices, RegionCommand, RegionWriter, UplinkOutcome};
    use crate::store::{RegionBatch, RegionStore};

    /// Hands the writer `payload` from `from` as a group of its own; the answer comes once the
    /// group is decided (at once if refused, after its commit if not).
    fn send(
        writer: &mut RegionWriter,
        from: &Loader,
        payload: &[u8],
    ) -> oneshot::Receiver<UplinkOutcome> {
        let (reply, answer) = oneshot::channel();
        writer.process(vec![RegionCommand::Uplink {
            topic_device: from.id.clone(),
            payload: payload.to_vec().into(),
            reply,
            pre: None,
        }]);
        answer
    }

    fn acked(up_to: u64) -> UplinkOutcome {
        UplinkOutcome::Ack(Ack { up_to, gap: false })
    }

    /// A region store with `loaders` enrolled.
    fn store_with(path: &std::path::Path, loaders: &[&Loader]) -> RegionStore {
        let mut store = RegionStore::open(path).expect("store");
        let enroll = RegionBatch {
            enroll: loaders.iter().map(|l| record(&l.id, &l.key)).collect(),
            ..RegionBatch::default()
        };
        store.commit(&enroll).expect("commit");
        store
    }

    fn has_unit(writer: &RegionWriter, unit: &str) -> bool {
        writer.ledgers[&fridge()]
            .unit(&UnitId::new(unit).expect("id"), 0)
            .is_some()
    }

    /// While a device's batch is still being committed, the writer checks the device's next
    /// envelopes against the progress that batch makes, not the store's: a copy of the
    /// envelope in flight is a replay, and the one after it continues its stream and its audit
    /// chain.
    #[test]
    fn the_group_after_a_batch_in_flight_sees_its_progress() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("region.db");
        let region = RegionId::new("north").expect("id");
        let hub = SecretKey::generate().expect("key");
        let mut pos = Loader::new("pos-a");
        let store = store_with(&path, &[&pos]);
        let mut writer = writer(&region, store, &hub);
        let (first, _) = pos.load(&region, &hub, "u-1");
        let (second, _) = pos.load(&region, &hub, "u-2");

        // Another connection holds the write lock, so the first batch stays in flight.
        let lock = rusqlite::Connection::open(&path).expect("connection");
        lock.execute_batch("BEGIN IMMEDIATE").expect("write lock");
        let first_answer = send(&mut writer, &pos, &first);
        let stored: i64 = lock
            .query_row(
                "SELECT last_env_seq FROM devices WHERE device_id = 'pos-a'",
                [],
                |r| r.get(0),
            )
            .expect("device row");
        assert_eq!(stored, 0, "the first batch is not committed yet");
        let mut check = |payload: &[u8]| {
            writer.uplink(
                &pos.id,
                payload,
                None,
                &mut GroupDevices::default(),
                &mut RegionBatch::default(),
                larder_agent::writer::now_ms(),
            )
        };
        assert_eq!(check(&first), UplinkOutcome::Rejected("replayed"));
        assert_eq!(check(&second), acked(2));
        lock.execute_batch("ROLLBACK").expect("lock released");

        assert_eq!(first_answer.blocking_recv().expect("answered"), acked(1));
        let second_answer = send(&mut writer, &pos, &second);
        assert_eq!(second_answer.blocking_recv().expect("answered"), acked(2));
        assert!(writer.settle());
        let stored = writer.store.device(&pos.id).expect("read").expect("row").1;
        assert_eq!((stored.last_env_seq, stored.up_hwm), (2, 2));
    }

    /// A batch whose commit fails is refused, and so is the group the writer loaded on top of
    /// it while it was in flight: the writer's ledgers are reloaded from the store, so they hold
    /// neither, and each device's progress is as stored. Both envelopes sent again are taken,
    /// and the writer ends with exactly what its store holds.
    #[test]
    fn a_group_loaded_on_a_batch_that_fails_to_commit_is_refused_and_forgotten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("region.db");
        let region = RegionId::new("north").expect("id");
        let hub = SecretKey::generate().expect("key");
        let mut a = Loader::new("pos-a");
        let mut b = Loader::new("pos-b");
        let store = store_with(&path, &[&a, &b]);
        // The store refuses pos-b's audit rows, as a full disk would refuse the write.
        let admin = rusqlite::Connection::open(&path).expect("connection");
        admin
            .execute_batch(
                "CREATE TRIGGER doomed BEFORE INSERT ON audit WHEN NEW.device = 'pos-b'
                 BEGIN SELECT RAISE(ABORT, 'no room'); END;",
            )
            .expect("trigger");
        let mut writer = writer(&region, store, &hub);
        let (a1, _) = a.load(&region, &hub, "u-a1");
        let (a2, _) = a.load(&region, &hub, "u-a2");
        let (b1, _) = b.load(&region, &hub, "u-b1");

        let answers = [
            send(&mut writer, &a, &a1),
            send(&mut writer, &b, &b1),
            send(&mut writer, &a, &a2),
        ]
        .map(|answer| answer.blocking_recv().expect("answered"));
        assert_eq!(
            answers,
            [
                acked(1),
                UplinkOutcome::Rejected("storage"),
                UplinkOutcome::Rejected("storage")
            ],
            "the failed batch and the group loaded on it are refused"
        );
        assert!(has_unit(&writer, "u-a1"));
        assert!(!has_unit(&writer, "u-b1"), "the failed batch is forgotten");
        assert!(!has_unit(&writer, "u-a2"), "the group on top is forgotten");

        assert_eq!(
            send(&mut writer, &a, &a2)
                .blocking_recv()
                .expect("answered"),
            acked(2)
        );
        admin
            .execute_batch("DROP TRIGGER doomed")
            .expect("room again");
        assert_eq!(
            send(&mut writer, &b, &b1)
                .blocking_recv()
                .expect("answered"),
            acked(1)
        );
        assert!(writer.settle());
        for unit in ["u-a1", "u-a2", "u-b1"] {
            assert!(has_unit(&writer, unit), "{unit} is kept");
        }
        let changes: i64 = admin
            .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
            .expect("count");
        assert_eq!(changes, 3, "each change is stored once");
        let reopened =
            super::super::testing::writer(&region, RegionStore::open(&path).expect("store"), &hub);
        assert_eq!(
            writer.ledgers[&fridge()].state_digest(),
            reopened.ledgers[&fridge()].state_digest(),
            "the writer holds what its store holds"
        );
    }
}
