//! The region's committer thread, which commits import batches while the writer loads the next.
//!
//! A bulk import keeps the writer busy with two kinds of work per request: loading the rows
//! into the fridges' ledgers (in memory) and writing the batch's rows to SQLite. The committer
//! does the second on its own thread and connection, so the writer can load request N+1 while
//! request N is written. Once a batch is committed (`synchronous=FULL`), the committer answers
//! its requests, publishes its events and raises the downlink head, in commit order.
//!
//! The writer keeps one rule: it *settles* (waits for the batch in flight) before it touches
//! its own connection or commits anything else, so the two connections never write at once
//! and every read sees what was committed before. Only groups of import batches without an
//! Idempotency-Key go to the committer; they read nothing from the store. (A keyed batch's
//! retry reads the first one's stored answer, so it is committed by the writer.)

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

/// The writer's handle on its committer: at most one batch in flight.
#[derive(Debug)]
pub(super) struct Committer {
    jobs: Option<mpsc::Sender<Box<Job>>>,
    done: mpsc::Receiver<Result<(), String>>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
    /// For answering a batch the thread never got.
    region: RegionId,
    metrics: Arc<HubMetrics>,
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
        let (region, metrics) = (outlets.region.clone(), outlets.metrics.clone());
        let thread = std::thread::Builder::new()
            .name(format!("commit-{}", outlets.region))
            .spawn(move || run(store, outlets, job_rx, done_tx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the committer: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            in_flight: false,
            thread: Some(thread),
            region,
            metrics,
        })
    }

    /// Hands over a batch; the caller has settled the one before.
    pub(super) fn commit(&mut self, job: Job) -> Result<(), String> {
        debug_assert!(!self.in_flight);
        let Some(jobs) = self.jobs.as_ref() else {
            answer(job.pending, Err(gone()), &self.metrics, &self.region);
            return Err("the committer has stopped".into());
        };
        if let Err(mpsc::SendError(job)) = jobs.send(Box::new(job)) {
            answer(job.pending, Err(gone()), &self.metrics, &self.region);
            return Err("the committer has stopped".into());
        }
        self.in_flight = true;
        Ok(())
    }

    /// Waits for the batch in flight, if any: `Err` if its commit failed (its requests were
    /// answered with the error).
    pub(super) fn settle(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(());
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
    done: mpsc::Sender<Result<(), String>>,
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
                if !job.batch.changes.is_empty() {
                    outlets
                        .metrics
                        .changes_merged
                        .get_or_create(&region)
                        .inc_by(job.batch.changes.len() as u64);
                    match store.head() {
                        Ok(head) => raise_head(&outlets.head_tx, head),
                        Err(e) => error!(error = %e, "reading the change head failed"),
                    }
                }
                for kind in job.events {
                    outlets.events.publish(kind);
                }
                answer(job.pending, Ok(()), &outlets.metrics, &outlets.region);
                Ok(())
            }
            Err(e) => {
                error!(region = %outlets.region, error = %e, "region commit failed; import batch refused");
                outlets.metrics.commit_failures.inc();
                answer(
                    job.pending,
                    Err(RegionError::Storage(e.to_string())),
                    &outlets.metrics,
                    &outlets.region,
                );
                Err(e.to_string())
            }
        };
        if done.send(settled).is_err() {
            return;
        }
    }
}
