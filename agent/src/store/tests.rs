//! The agent store's own tests: batches, archives, migrations and the read pool.

use super::*;

/// Where a connection lives: the same value each time the same connection is used.
fn which(conn: &Connection) -> rusqlite::Result<usize> {
    Ok(std::ptr::from_ref(conn).addr())
}

fn archived(id: &str) -> larder_shared::ledger::compaction::Archived {
    larder_shared::ledger::compaction::Archived {
        kind: larder_shared::ledger::compaction::ArchivedKind::Order,
        id: id.to_owned(),
        record: serde_json::json!({"orders": [id]}),
    }
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect("count")
}

/// A rebase's records are archived in a commit of their own before the rebase: when the
/// rebase's commit then fails (as a power cut between the two would leave it), the records
/// are archived and the live state is untouched; the rebase redone archives nothing twice.
#[test]
fn a_rebase_archives_first_and_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.db");
    let mut store = Store::open(&path).expect("store");
    let fridge = FridgeId::new("fridge-1").expect("id");
    let change = WriteBatch {
        changes: vec![ChangeRow {
            fridge: fridge.clone(),
            epoch: 0,
            outbox_seq: Some(1),
            chain: None,
            bytes: vec![1, 2, 3],
            hub_sig: None,
        }],
        ..WriteBatch::default()
    };
    store.commit_batch(&change, 1).expect("commit");
    let rebase = WriteBatch {
        rebases: vec![RebaseWrite {
            fridge: fridge.clone(),
            epoch: 1,
            base: vec![9],
            archived: vec![archived("o-1"), archived("o-2")],
        }],
        ..WriteBatch::default()
    };
    let admin = Connection::open(&path).expect("connection");
    admin
        .execute_batch(
            "CREATE TRIGGER cut BEFORE INSERT ON ledger_snapshots
             BEGIN SELECT RAISE(ABORT, 'power cut'); END;",
        )
        .expect("trigger");
    store
        .commit_batch(&rebase, 2)
        .expect_err("the rebase's commit fails");
    let archive = Connection::open(archive_path(&path)).expect("archive");
    assert_eq!(
        count(&archive, "SELECT COUNT(*) FROM archive"),
        2,
        "archived first"
    );
    assert_eq!(
        count(&admin, "SELECT COUNT(*) FROM ledger_changes"),
        1,
        "the live state is as it was"
    );
    admin.execute_batch("DROP TRIGGER cut").expect("drop");
    store.commit_batch(&rebase, 3).expect("the rebase redone");
    assert_eq!(
        count(&archive, "SELECT COUNT(*) FROM archive"),
        2,
        "archived once"
    );
    assert_eq!(count(&admin, "SELECT COUNT(*) FROM ledger_changes"), 0);
}

/// A store from before the archive's unique index (and before versions) loses its
/// duplicate rows, keeping the first, when it is opened.
#[test]
fn opening_an_older_archive_removes_its_duplicates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.db");
    drop(Store::open(&path).expect("store"));
    Connection::open(&path)
        .expect("store")
        .pragma_update(None, "user_version", 0)
        .expect("a store from before versions");
    let archive = Connection::open(archive_path(&path)).expect("archive");
    archive
        .execute_batch(
            "DROP INDEX archive_once;
             INSERT INTO archive (fridge, epoch, kind, record_id, record, archived_at_ms)
             VALUES ('fridge-1', 0, 'order', 'o-1', 'first', 1),
                    ('fridge-1', 0, 'order', 'o-1', 'again', 2),
                    ('fridge-1', 1, 'order', 'o-1', 'next epoch', 3);",
        )
        .expect("an older archive");
    drop(Store::open(&path).expect("store"));
    let kept: Vec<String> = archive
        .prepare("SELECT record FROM archive ORDER BY id")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(kept, ["first", "next epoch"]);
}

/// Reads one at a time all use the first connection, so one page cache stays warm rather
/// than every connection caching the same pages; a read while it is busy uses another.
#[test]
fn reads_prefer_the_first_idle_connection() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.db");
    Store::open(&path).expect("store");
    let readers = Readers::open(&path, 3, Some(READ_CACHE_KIB)).expect("readers");
    let first = readers.with(which).expect("read");
    for _ in 0..10 {
        assert_eq!(readers.with(which).expect("read"), first);
    }
    let mut inner = None;
    let outer = readers
        .with(|conn| {
            inner = Some(readers.with(which).expect("read"));
            which(conn)
        })
        .expect("read");
    assert_eq!(outer, first);
    assert!(inner.is_some_and(|i| i != first));
}

/// A store whose archive file was lost gets an empty archive again when it is opened, though
/// its version says the archive was made long ago.
#[test]
fn a_lost_archive_file_is_made_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.db");
    drop(Store::open(&path).expect("store"));
    std::fs::remove_file(archive_path(&path)).expect("the archive lost");
    drop(Store::open(&path).expect("opened again"));
    let archive = Connection::open(archive_path(&path)).expect("archive");
    assert_eq!(count(&archive, "SELECT COUNT(*) FROM archive"), 0);
    let once: i64 = count(
        &archive,
        "SELECT COUNT(*) FROM sqlite_master WHERE name = 'archive_once'",
    );
    assert_eq!(once, 1, "its unique index too");
}

/// The hub's changes are kept in the order they first came, each with the generation that
/// sent it last and its number there; a store begun at an origin lacks all but what that
/// generation numbered up to its position; the newest `HUB_CHANGES_KEPT` outlive a compaction.
#[test]
fn the_hubs_changes_are_kept_and_judged_by_generation_and_number() {
    use larder_shared::envelope::{Generation, Origin};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.db");
    let mut store = Store::open(&path).expect("store");
    let fridge = FridgeId::new("fridge-1").expect("id");
    let (g1, g2) = (Generation([1; 16]), Generation([2; 16]));
    let change = |n: u64, generation: Generation, down_seq: u64| HubChange {
        generation: Some(generation),
        down_seq,
        fridge: fridge.clone(),
        epoch: 0,
        bytes: n.to_be_bytes().to_vec(),
        sig: vec![1; 64],
    };
    let kept = given_back::HUB_CHANGES_KEPT;
    let batch = WriteBatch {
        hub_changes: (1..=kept + 10).map(|n| change(n, g1, n)).collect(),
        ..WriteBatch::default()
    };
    store.commit_batch(&batch, 1).expect("commit");
    // The first one comes again from a restored store, numbered anew.
    let again = WriteBatch {
        hub_changes: vec![change(1, g2, 3)],
        ..WriteBatch::default()
    };
    store.commit_batch(&again, 2).expect("commit");
    let lacked = |store: &Store, origin: Option<Origin>| -> Vec<u64> {
        store
            .hub_changes_lacked(origin)
            .expect("read")
            .into_iter()
            .map(|c| u64::from_be_bytes(c.bytes.try_into().expect("8 bytes")))
            .collect()
    };
    let from = |generation, changes_up_to| {
        Some(Origin {
            generation,
            changes_up_to,
        })
    };
    // Begun at g1's change 2: change 2 is there; change 1 came last from g2, so it may not be.
    assert_eq!(lacked(&store, from(g1, 2))[..3], [1, 3, 4]);
    // Begun at g2's change 5: change 1 is there; every one g1 sent may not be.
    assert_eq!(lacked(&store, from(g2, 5))[..2], [2, 3]);
    assert_eq!(lacked(&store, from(g2, 5)).len() as u64, kept + 9);
    // A store made empty lacks them all.
    assert_eq!(lacked(&store, None).len() as u64, kept + 10);
    store
        .compact_ledger(&fridge, b"snapshot", 0)
        .expect("compact");
    let left = lacked(&store, None);
    assert_eq!(left.len() as u64, kept);
    assert_eq!(
        (left[0], left[left.len() - 1]),
        (11, kept + 10),
        "the newest kept"
    );
}
