//! Answers to the API's requests: the contract's error bodies, and each answer stored with its
//! Idempotency-Key so that a retry gets the first answer and changes nothing.

use super::*;

pub(super) fn error_answer(status: u16, code: &str, message: impl std::fmt::Display) -> ApiAnswer {
    (
        status,
        serde_json::json!({"error": {"code": code, "message": message.to_string()}}),
    )
}

/// The API's answer for a ledger error (nothing was changed).
pub(super) fn ledger_error_answer(e: &larder_shared::ledger::LedgerError) -> ApiAnswer {
    let (status, code) = larder_runtime::http::ledger_error_status(e);
    error_answer(status.as_u16(), code, e)
}

/// What a group of commands builds: its transaction, the answers waiting for its commit, and
/// the answers stored under Idempotency-Keys within it.
pub(super) type InGroup<'a> = (
    &'a mut RegionBatch,
    &'a mut Vec<Pending>,
    &'a mut HashMap<String, (String, ApiAnswer)>,
);

/// A request whose Idempotency-Key was seen before (see [`RegionWriter::replay`]).
pub(super) enum Replay {
    /// The same request again: its first answer.
    First(ApiAnswer),
    /// The key was used with another request.
    KeyReused,
}

/// Stores a request's answer under its Idempotency-Key, in the group's transaction.
pub(super) fn remember(
    idem: Option<Idem>,
    answer: &ApiAnswer,
    batch: &mut RegionBatch,
    in_group: &mut HashMap<String, (String, ApiAnswer)>,
) {
    if let Some(idem) = idem {
        batch.idempotency.push(IdempotencyRow {
            key: idem.key.clone(),
            request_sha256: idem.request_sha256.clone(),
            status: answer.0,
            response: answer.1.to_string(),
        });
        in_group.insert(idem.key, (idem.request_sha256, answer.clone()));
    }
}

/// Sends each waiting request its answer: what it staged, once `result` says the group was
/// committed, or the group's error. Counts the group's envelopes in `metrics`: accepted once
/// committed, or rejected for `storage`.
pub(super) fn answer(
    pending: Vec<Pending>,
    result: Result<(), RegionError>,
    metrics: &HubMetrics,
    region: &RegionId,
) {
    let uplinks = pending
        .iter()
        .filter(|p| matches!(p, Pending::Uplink(..)))
        .count() as u64;
    if uplinks > 0 {
        if result.is_ok() {
            metrics
                .envelopes_accepted
                .get_or_create(&vec![("region", region.to_string())])
                .inc_by(uplinks);
        } else {
            metrics.rejected_by(region.as_str(), "storage", uplinks);
        }
    }
    for p in pending {
        match (p, &result) {
            (Pending::Answer(reply, answer), Ok(())) => {
                let _ = reply.send(Ok(answer));
            }
            (Pending::Answer(reply, _), Err(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
            (Pending::Uplink(reply, outcome), Ok(())) => {
                let _ = reply.send(outcome);
            }
            (Pending::Uplink(reply, _), Err(_)) => {
                let _ = reply.send(UplinkOutcome::Rejected("storage"));
            }
            (Pending::Enroll(reply, record), Ok(())) => {
                let _ = reply.send(Ok(*record));
            }
            (Pending::Enroll(reply, _), Err(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
            (Pending::Unit(reply), r) => {
                let _ = reply.send(r.clone());
            }
            (Pending::Import(reply, report), Ok(())) => {
                let _ = reply.send(Ok(report));
            }
            (Pending::Import(reply, _), Err(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

impl RegionWriter {
    /// Answers an API request once: a retry (the same Idempotency-Key and request) gets the
    /// stored answer and changes nothing; a new request runs `act`, whose answer is stored with
    /// the group's transaction and sent once it is committed. `Err` answers change nothing and
    /// go at once.
    pub(super) fn answer_once(
        &mut self,
        idem: Option<Idem>,
        reply: Reply<ApiAnswer>,
        (batch, pending, in_group): InGroup<'_>,
        act: impl FnOnce(&mut Self, &mut RegionBatch) -> Result<ApiAnswer, ApiAnswer>,
    ) {
        match self.replay(idem.as_ref(), in_group) {
            Some(Replay::First(answer)) => {
                let _ = reply.send(Ok(answer));
                return;
            }
            Some(Replay::KeyReused) => {
                let _ = reply.send(Ok(error_answer(
                    409,
                    "idempotency_key_reused",
                    RegionError::IdempotencyKeyReused,
                )));
                return;
            }
            None => {}
        }
        match act(self, batch) {
            Ok(answer) => {
                remember(idem, &answer, batch, in_group);
                pending.push(Pending::Answer(reply, answer));
            }
            Err(answer) => {
                let _ = reply.send(Ok(answer));
            }
        }
    }

    /// What a request with an Idempotency-Key (and request hash) was answered before: `None`
    /// for a new request.
    pub(super) fn replay(
        &self,
        idem: Option<&Idem>,
        in_group: &HashMap<String, (String, ApiAnswer)>,
    ) -> Option<Replay> {
        let idem = idem?;
        let (h, status, body) = match in_group.get(&idem.key) {
            Some((h, a)) => (h.clone(), a.0, a.1.to_string()),
            None => self.store.idempotency(&idem.key).ok()??,
        };
        Some(if h == idem.request_sha256 {
            Replay::First((status, serde_json::from_str(&body).unwrap_or_default()))
        } else {
            Replay::KeyReused
        })
    }
}
