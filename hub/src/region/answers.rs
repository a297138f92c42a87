//! Answers to the writer's requests, sent once their group committed, and each API answer
//! stored with its Idempotency-Key so that a retry gets the first answer and changes nothing.

use super::*;

/// An answer kept under an Idempotency-Key within a group: the request's hash and what it was
/// answered, as the store keeps it.
#[derive(Debug, Clone)]
pub(super) struct Kept {
    request_sha256: String,
    status: u16,
    body: serde_json::Value,
}

/// The answers a group kept under Idempotency-Keys, by key.
pub(super) type KeptInGroup = HashMap<String, Kept>;

/// What a group of commands builds: its transaction, the answers waiting for its commit, and
/// the answers stored under Idempotency-Keys within it.
pub(super) type InGroup<'a> = (
    &'a mut RegionBatch,
    &'a mut Vec<Pending>,
    &'a mut KeptInGroup,
);

/// A request whose Idempotency-Key was seen before (see [`RegionWriter::replay`]).
pub(super) enum Replay {
    /// The same request again: the status and body it was answered first.
    First(u16, serde_json::Value),
    /// The key was used with another request.
    KeyReused,
}

/// Stores a request's answer (`status` and `body`) under its Idempotency-Key, in the group's
/// transaction.
pub(super) fn remember(
    idem: Option<Idem>,
    (status, body): (u16, serde_json::Value),
    batch: &mut RegionBatch,
    in_group: &mut KeptInGroup,
) {
    if let Some(idem) = idem {
        batch.idempotency.push(IdempotencyRow {
            key: idem.key.clone(),
            request_sha256: idem.request_sha256.clone(),
            status,
            response: body.to_string(),
        });
        let kept = Kept {
            request_sha256: idem.request_sha256,
            status,
            body,
        };
        in_group.insert(idem.key, kept);
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
            (Pending::Answer(reply, outcome), Ok(())) => {
                let _ = reply.send(Ok(outcome));
            }
            (Pending::Answer(reply, _), Err(e)) => {
                let _ = reply.send(Err(e.clone()));
            }
            (Pending::Refused(reply, refusal), Ok(())) => {
                let _ = reply.send(Err(refusal));
            }
            (Pending::Refused(reply, _), Err(e)) => {
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
    /// stored answer and changes nothing; a new request runs `act`, whose outcome is stored with
    /// the group's transaction. Every answer, a replay or a refusal too, is sent once the group
    /// is committed: a replay may be of a request in this very group.
    pub(super) fn answer_once(
        &mut self,
        idem: Option<Idem>,
        reply: Reply<Outcome>,
        (batch, pending, in_group): InGroup<'_>,
        act: impl FnOnce(&mut Self, &mut RegionBatch) -> Result<Outcome, RegionError>,
    ) {
        let answer = match self.replay(idem.as_ref(), in_group) {
            Ok(None) => act(self, batch).inspect(|outcome| {
                remember(idem, (outcome.status(), outcome.body()), batch, in_group);
            }),
            Ok(Some(Replay::First(status, body))) => Ok(Outcome::Replayed { status, body }),
            Ok(Some(Replay::KeyReused)) => Err(RegionError::IdempotencyKeyReused),
            Err(e) => Err(e),
        };
        pending.push(match answer {
            Ok(outcome) => Pending::Answer(reply, outcome),
            Err(e) => Pending::Refused(reply, e),
        });
    }

    /// What a request with an Idempotency-Key (and request hash) was answered before: `None`
    /// for a new request. A store that cannot say is an error, not a new request: taking it
    /// as new could do a retried request twice.
    pub(super) fn replay(
        &self,
        idem: Option<&Idem>,
        in_group: &KeptInGroup,
    ) -> Result<Option<Replay>, RegionError> {
        let Some(idem) = idem else {
            return Ok(None);
        };
        let (h, status, body) = match in_group.get(&idem.key) {
            Some(kept) => (kept.request_sha256.clone(), kept.status, kept.body.clone()),
            None => {
                let stored = self.store.idempotency(&idem.key).map_err(|e| {
                    error!(region = %self.region, error = %e, "reading an Idempotency-Key failed");
                    RegionError::Storage(e.to_string())
                })?;
                let Some((h, status, body)) = stored else {
                    return Ok(None);
                };
                let body = serde_json::from_str(&body).map_err(|e| {
                    RegionError::Storage(format!("a stored answer is unreadable: {e}"))
                })?;
                (h, status, body)
            }
        };
        Ok(Some(if h == idem.request_sha256 {
            Replay::First(status, body)
        } else {
            Replay::KeyReused
        }))
    }
}
