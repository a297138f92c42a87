//! Backups of a hub. `larder-hub backup` copies every region store while the hub serves
//! (`VACUUM INTO`: one read transaction per store, which holds up no writer), with the hub's key
//! and a manifest written last (program, schema versions, each device's stream positions,
//! checksums). `backup verify` checks a backup against its manifest and SQLite's integrity
//! check; `restore` puts one back into the data directory of a stopped hub. Litestream's side
//! (its config, and `promote`, a standby taking over from the replica) is in [`replica`].

use std::io::Write;
use std::path::{Path, PathBuf};

use larder_runtime::sqlite::{StoreError, copy_into, integrity_problems};
use larder_shared::RegionId;
use larder_shared::envelope::Generation;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::HubConfig;
use crate::store::{REGION_SCHEMA, read_copy};

mod replica;
pub use replica::{litestream_config, promote};

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// The hub key's file name in a backup directory.
pub const KEY_FILE: &str = "hub.key";

/// What a backup holds, written last: a directory without it is not a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The program that took it (name and version).
    pub program: String,
    /// When it was taken (RFC 3339).
    pub taken_at: String,
    pub regions: Vec<RegionCopy>,
    /// The hub's key, if it had a key file: its public half and the file's checksum.
    pub hub_key: Option<KeyCopy>,
}

/// One region store's copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionCopy {
    pub region: String,
    /// Its file in the backup directory.
    pub file: String,
    pub schema_version: u32,
    pub bytes: u64,
    pub sha256: String,
    /// Each device's stream positions in the copy: where a restored hub stands with it.
    pub devices: Vec<DeviceHeads>,
}

/// A device's stream positions in a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHeads {
    pub device_id: String,
    /// The device's uplink stream position the hub held everything up to.
    pub up_hwm: u64,
    /// The hub's downlink stream position the device had acknowledged.
    pub down_acked: u64,
    pub last_env_seq: u64,
    pub revoked: bool,
}

/// The hub key's copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCopy {
    pub public_key: String,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Refused before anything was changed.
    #[error("{0}")]
    Refused(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Failed part way: what was done before it, for the operator.
    #[error("{source} (done before it: {done})")]
    Incomplete {
        done: String,
        source: Box<BackupError>,
    },
    #[error("{}: {source}", path.display())]
    Store {
        path: PathBuf,
        source: Box<StoreError>,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn store(path: &Path) -> impl FnOnce(StoreError) -> BackupError + '_ {
    move |source| BackupError::Store {
        path: path.to_path_buf(),
        source: Box::new(source),
    }
}

/// A file's size and SHA-256 (hex).
fn checksum(path: &Path) -> Result<(u64, String), BackupError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Makes a directory's entries durable (a rename or a new file in it).
fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Copies `from` to `to` (mode 0600) and syncs it.
fn copy_private(from: &Path, to: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = std::fs::read(from).map_err(io(from))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io(to))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(io(to))
}

/// Takes a backup of every region store `config` names (those that exist) and the hub's key
/// into `out`, a new or empty directory, while the hub may be serving. Each store is copied in
/// one read transaction; the manifest is written last, synced and renamed into place.
pub fn backup(config: &HubConfig, out: &Path, taken_at_ms: i64) -> Result<Manifest, BackupError> {
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(BackupError::Refused(format!(
            "{} is not empty: a backup goes into a new directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    let mut regions = Vec::new();
    for r in &config.regions {
        let live = config.region_db(&r.id);
        if !live.exists() {
            continue;
        }
        let file = format!("region-{}.db", r.id);
        let copy = out.join(&file);
        copy_into(&live, &copy).map_err(store(&live))?;
        let (schema_version, devices) = read_copy(&copy).map_err(store(&copy))?;
        let (bytes, sha256) = checksum(&copy)?;
        regions.push(RegionCopy {
            region: r.id.to_string(),
            file,
            schema_version,
            bytes,
            sha256,
            devices: devices
                .into_iter()
                .map(|(d, p)| DeviceHeads {
                    device_id: d.device_id.to_string(),
                    up_hwm: p.up_hwm,
                    down_acked: p.down_acked,
                    last_env_seq: p.last_env_seq,
                    revoked: d.revoked_at_ms.is_some(),
                })
                .collect(),
        });
    }
    let key_path = config.key_path();
    let hub_key = if key_path.exists() {
        let key = crate::load_or_create_key(&key_path).map_err(BackupError::Refused)?;
        let copy = out.join(KEY_FILE);
        copy_private(&key_path, &copy)?;
        Some(KeyCopy {
            public_key: key.public().to_string(),
            sha256: checksum(&copy)?.1,
        })
    } else {
        None
    };
    let manifest = Manifest {
        program: concat!("larder-hub ", env!("CARGO_PKG_VERSION")).to_owned(),
        taken_at: jiff::Timestamp::from_millisecond(taken_at_ms)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        regions,
        hub_key,
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BackupError::Refused(format!("the manifest: {e}")))?;
    let partial = out.join(format!("{MANIFEST}.partial"));
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::File::open(&partial)?.sync_all())
        .map_err(io(&partial))?;
    // The copies' entries are durable before the manifest that names them.
    sync_dir(out)?;
    let done = out.join(MANIFEST);
    std::fs::rename(&partial, &done).map_err(io(&done))?;
    sync_dir(out)?;
    Ok(manifest)
}

/// Checks the backup in `dir`: its manifest, every file's size and checksum, SQLite's integrity
/// check on every store, and that no store is newer than this program. Answers the manifest,
/// or every problem found, one line each.
pub fn verify(dir: &Path) -> Result<Manifest, Vec<String>> {
    let path = dir.join(MANIFEST);
    let manifest: Manifest = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| {
            vec![format!(
                "{}: {e} (an unfinished backup has none)",
                path.display()
            )]
        })?;
    let mut problems = Vec::new();
    let check_file = |file: &str, sha256: &str, bytes: Option<u64>| -> Option<String> {
        let path = dir.join(file);
        match checksum(&path) {
            Err(e) => Some(e.to_string()),
            Ok((b, s)) if s != sha256 || bytes.is_some_and(|n| n != b) => Some(format!(
                "{}: its content is not what the manifest records (sha256 {s}, {b} bytes)",
                path.display()
            )),
            Ok(_) => None,
        }
    };
    for r in &manifest.regions {
        if r.file != format!("region-{}.db", r.region) || r.file.contains('/') {
            problems.push(format!(
                "{}: names the file {:?} for region {:?}, not region-{}.db",
                path.display(),
                r.file,
                r.region,
                r.region
            ));
            continue;
        }
        problems.extend(check_file(&r.file, &r.sha256, Some(r.bytes)));
    }
    if let Some(key) = &manifest.hub_key {
        problems.extend(check_file(KEY_FILE, &key.sha256, None));
    }
    for r in manifest
        .regions
        .iter()
        .filter(|r| r.file == format!("region-{}.db", r.region) && !r.file.contains('/'))
    {
        let path = dir.join(&r.file);
        if r.schema_version > REGION_SCHEMA.version() {
            problems.push(format!(
                "{}: at version {}, newer than this program's {}: restore it with the release \
                 that took it",
                path.display(),
                r.schema_version,
                REGION_SCHEMA.version()
            ));
        }
        match integrity_problems(&path) {
            Ok(found) => problems.extend(
                found
                    .into_iter()
                    .map(|p| format!("{}: {p}", path.display())),
            ),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(problems)
    }
}

/// Puts the backup in `from` back into `config`'s data directory, once it verifies. Refuses,
/// changing nothing, while the hub seems to run (its fixed HTTP address is taken: a check, not
/// a lock, so stop the hub first), when a region store exists and `replace` is not set, or
/// when the config's key file holds another key. Every store is copied beside its place,
/// synced and checked against the manifest before any is replaced; each then takes its place,
/// the old store kept beside it (`….db.pre-restore`). Answers a line per region for the
/// operator; an error part way says what was done before it.
pub fn restore(config: &HubConfig, from: &Path, replace: bool) -> Result<Vec<String>, BackupError> {
    let manifest = verify(from).map_err(|p| BackupError::Refused(p.join("\n")))?;
    refuse_if_running(config)?;
    let mut said: Vec<String> = Vec::new();
    let mut plan = Vec::new();
    for copy in &manifest.regions {
        let known = RegionId::new(&copy.region)
            .ok()
            .filter(|id| config.regions.iter().any(|r| &r.id == id));
        let Some(region) = known else {
            said.push(format!(
                "region {}: in the backup, not in the config; skipped",
                copy.region
            ));
            continue;
        };
        let dest = config.region_db(&region);
        if dest.exists() && !replace {
            return Err(BackupError::Refused(format!(
                "region {region} has a store at {}: restore replaces it only with --replace",
                dest.display()
            )));
        }
        plan.push((copy, dest));
    }
    let key_path = config.key_path();
    let copy_key = match &manifest.hub_key {
        Some(key) if key_path.exists() => {
            if checksum(&key_path)?.1 != key.sha256 {
                return Err(BackupError::Refused(format!(
                    "{} holds another key than the backup's (public key {}): move it away to \
                     restore the backup's key, or restore into a hub with that key",
                    key_path.display(),
                    key.public_key
                )));
            }
            false
        }
        Some(_) => true,
        None => false,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(io(&config.data_dir))?;
    // Every copy staged beside its place and checked first: nothing is replaced until all are.
    let mut staged = Vec::with_capacity(plan.len());
    for (copy, dest) in plan {
        let at = dest.with_extension("db.restoring");
        let _ = std::fs::remove_file(&at);
        std::fs::copy(from.join(&copy.file), &at)
            .and_then(|_| std::fs::File::open(&at)?.sync_all())
            .map_err(io(&at))?;
        if checksum(&at)?.1 != copy.sha256 {
            let _ = std::fs::remove_file(&at);
            return Err(BackupError::Refused(format!(
                "{}: the copy is not what the manifest records (it changed after it was verified); nothing was replaced",
                from.join(&copy.file).display()
            )));
        }
        let renewed = renew_generation(&at)?;
        staged.push((copy, dest, at, renewed));
    }
    sync_dir(&config.data_dir)?;
    for (copy, dest, at, generation) in staged {
        if let Err(e) = replace_store(&at, &dest) {
            return Err(BackupError::Incomplete {
                done: said.join("; "),
                source: Box::new(e),
            });
        }
        said.push(format!(
            "region {}: restored to {} ({} devices, taken {}; new generation {generation})",
            copy.region,
            dest.display(),
            copy.devices.len(),
            manifest.taken_at
        ));
    }
    if copy_key {
        copy_private(&from.join(KEY_FILE), &key_path)?;
        said.push(format!("hub key restored to {}", key_path.display()));
    }
    sync_dir(&config.data_dir)?;
    for r in &config.regions {
        if !manifest.regions.iter().any(|c| c.region == r.id.as_str()) {
            said.push(format!("region {}: not in the backup; left as it is", r.id));
        }
    }
    Ok(said)
}

/// Refuses while the hub seems to run: its fixed HTTP address is taken (a check, not a lock).
fn refuse_if_running(config: &HubConfig) -> Result<(), BackupError> {
    let listen = config.http.listen;
    if listen.port() != 0
        && let Err(e) = std::net::TcpListener::bind(listen)
        && e.kind() == std::io::ErrorKind::AddrInUse
    {
        return Err(BackupError::Refused(format!(
            "the hub seems to be running: its HTTP address {listen} is taken. Stop it first \
             (systemctl stop larder-hub)"
        )));
    }
    Ok(())
}

/// Makes the staged store at `at` a new generation: a restored store may lack what devices
/// were told before, and they offer it again when they see the change. The file is synced
/// once the connection has closed (a store in WAL mode is checkpointed into it then), so it
/// is on disk whole before it is put in place. Answers the new one.
fn renew_generation(at: &Path) -> Result<Generation, BackupError> {
    let generation = rusqlite::Connection::open(at)
        .map_err(StoreError::from)
        .and_then(|conn| {
            let generation = crate::store::generation::renew(&conn)?;
            conn.close().map_err(|(_, e)| StoreError::from(e))?;
            Ok(generation)
        })
        .map_err(|e| BackupError::Store {
            path: at.to_path_buf(),
            source: Box::new(e),
        })?;
    let wal = std::path::PathBuf::from(format!("{}-wal", at.display()));
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Err(BackupError::Refused(format!(
            "{}: its write-ahead log was not checkpointed when it closed; nothing was replaced",
            at.display()
        )));
    }
    std::fs::File::open(at)
        .and_then(|f| f.sync_all())
        .map_err(io(at))?;
    Ok(generation)
}

/// Puts the staged copy `staged` in place of the store at `dest`. A store there is kept beside
/// it, with its write-ahead log, as `….db.pre-restore` (and `….db.pre-restore-wal`), replacing
/// an older such pair; its WAL index is removed (SQLite makes it again).
fn replace_store(staged: &Path, dest: &Path) -> Result<(), BackupError> {
    let aside = dest.with_extension("db.pre-restore");
    for (from, to) in [
        (dest.to_path_buf(), aside.clone()),
        (
            dest.with_extension("db-wal"),
            aside.with_extension("pre-restore-wal"),
        ),
    ] {
        match std::fs::rename(&from, &to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&from)(e)),
            _ => {}
        }
    }
    let shm = dest.with_extension("db-shm");
    match std::fs::remove_file(&shm) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&shm)(e)),
        _ => {}
    }
    std::fs::rename(staged, dest).map_err(io(dest))
}
