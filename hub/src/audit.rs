//! `larder-hub audit verify`: checks every device's audit chain in a region's store: each entry
//! links to the one before it, its hash matches its contents (and the change bytes the hub still
//! holds), and every batch head the device signed verifies with its key (or a key it rotated
//! away from). Names every gap and tampered entry.

use larder_shared::DeviceId;
use larder_shared::audit;

use crate::store::{RegionStore, StoreError};

/// What the check found for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAudit {
    pub device: DeviceId,
    pub entries: usize,
    pub signed_heads: usize,
    /// One line per problem; empty when the chain is intact.
    pub problems: Vec<String>,
}

/// Checks every enrolled device's chain.
pub fn verify(store: &RegionStore) -> Result<Vec<DeviceAudit>, StoreError> {
    let mut out = Vec::new();
    for (record, _) in store.devices()? {
        let device = record.device_id.clone();
        let chain = store.audit_chain(&device)?;
        // Heads are signed with the key in force when they were sent: the current key or one
        // a rotation retired.
        let mut keys = vec![record.public_key];
        keys.extend(store.retired_keys(&device, i64::MIN)?);
        let mut problems = Vec::new();
        let (mut prev_seq, mut expected) = (chain.base_seq, chain.base_hash);
        let mut signed_heads = 0;
        for e in &chain.entries {
            if e.prev != expected {
                problems.push(format!(
                    "gap before entry {}: it does not link to entry {prev_seq} (an entry is missing or was altered)",
                    e.seq
                ));
            }
            let hash = audit::entry_hash(
                &e.prev,
                &device,
                e.seq,
                &e.ledger,
                e.epoch,
                &e.change_sha256,
            );
            if hash != e.hash {
                problems.push(format!(
                    "entry {} tampered: its hash does not match its contents",
                    e.seq
                ));
            }
            if let Some(sig) = &e.head_sig {
                signed_heads += 1;
                if !keys
                    .iter()
                    .any(|k| audit::verify_head(k, &device, e.seq, &e.hash, sig))
                {
                    problems.push(format!(
                        "entry {}: the device's signature of this head does not verify",
                        e.seq
                    ));
                }
            }
            if let Some(bytes) = store.change_bytes(&e.change_sha256)?
                && audit::change_digest(&bytes) != e.change_sha256
            {
                problems.push(format!(
                    "entry {} tampered: the stored change bytes do not match its digest",
                    e.seq
                ));
            }
            (prev_seq, expected) = (e.seq, e.hash);
        }
        if let Some(last) = chain.entries.last() {
            if last.head_sig.is_none() {
                problems.push(format!(
                    "entry {} is the newest but carries no signed head (entries after it are missing)",
                    last.seq
                ));
            }
            if chain.head.is_some_and(|h| h != last.hash) {
                problems.push(format!(
                    "the chain head the hub recorded is not entry {}'s hash (newer entries are missing)",
                    last.seq
                ));
            }
        }
        out.push(DeviceAudit {
            device,
            entries: chain.entries.len(),
            signed_heads,
            problems,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditRow, DeviceRecord, RegionBatch};
    use larder_shared::domain::Role;
    use larder_shared::{FridgeId, SecretKey};

    /// A store with one POS whose chain has `n` entries, received at `1000 * seq` ms.
    fn store_with_chain(dir: &std::path::Path, n: u64) -> RegionStore {
        let key = SecretKey::from_seed([3; 32]);
        let device = DeviceId::new("pos-1").expect("id");
        let ledger = FridgeId::new("fridge-1").expect("id");
        let mut store = RegionStore::open(&dir.join("region.db")).expect("store");
        let mut batch = RegionBatch::default();
        batch.enroll.push(DeviceRecord {
            device_id: device.clone(),
            role: Role::Pos,
            site: None,
            fridges: vec![ledger.clone()],
            public_key: key.public(),
            enrolled_at_ms: 0,
            revoked_at_ms: None,
            last_seen_ms: None,
        });
        let mut head = audit::GENESIS;
        for seq in 1..=n {
            let digest = audit::change_digest(&seq.to_be_bytes());
            let hash = audit::entry_hash(&head, &device, seq, &ledger, 0, &digest);
            batch.audit.push(AuditRow {
                device: device.clone(),
                seq,
                ledger: ledger.clone(),
                epoch: 0,
                prev: head,
                hash,
                change_sha256: digest,
                head_sig: (seq % 4 == 0 || seq == n)
                    .then(|| audit::sign_head(&key, &device, seq, &hash)),
                received_at_ms: 1000 * seq as i64,
            });
            head = hash;
        }
        store.commit(&batch).expect("commit");
        store
    }

    #[test]
    fn an_intact_chain_verifies_and_pruning_keeps_it_verifiable() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = store_with_chain(dir.path(), 10);
        let report = verify(&store).expect("verify");
        assert_eq!(report[0].problems, Vec::<String>::new());
        assert_eq!((report[0].entries, report[0].signed_heads), (10, 3));

        // Entries received before 4.5 s go; the chain now starts after entry 4.
        let pruned = store.prune(4_500, i64::MIN).expect("prune").audit;
        assert_eq!(pruned, 4);
        let chain = store
            .audit_chain(&DeviceId::new("pos-1").expect("id"))
            .expect("chain");
        assert_eq!(chain.base_seq, 4);
        assert_eq!(chain.entries.first().map(|e| e.seq), Some(5));
        let report = verify(&store).expect("verify");
        assert_eq!(
            report[0].problems,
            Vec::<String>::new(),
            "a pruned prefix is no gap"
        );
        assert_eq!(report[0].entries, 6);
    }
}
