//! A SQLite file layer that can lose power: a VFS (through `sqlite-plugin`) that keeps every
//! file in memory and remembers, per file, the writes made since its last `xSync`. A power cut
//! ([`PowerCut::cut`]) takes an image of a directory as the disk would hold it after the power
//! failed: everything synced, plus each unsynced write kept whole, torn at a sector boundary or
//! lost, at random. kill -9 cannot test this: the kernel keeps a killed process's writes.
//!
//! Registered as the process's default VFS ([`PowerCut::install`]), it serves every SQLite file
//! the process opens, so the agent's real store code (its writer, readers, checkpointer and
//! archive) runs on it unchanged. Locks and the WAL index are kept in memory with SQLite's
//! semantics (shared, reserved, pending and exclusive file locks; shared and exclusive WAL
//! index slots), so several connections work as on a real disk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use sqlite_plugin::flags::{AccessFlags, LockLevel, OpenOpts, ShmLockMode};
use sqlite_plugin::vars;
use sqlite_plugin::vfs::{RegisterOpts, Vfs, VfsHandle, VfsResult, register_static};

/// Bytes a torn write keeps whole: a disk sector.
const SECTOR: usize = 512;

/// A write or truncation not yet synced, with what it replaced (to take it back).
#[derive(Debug)]
enum Unsynced {
    Write {
        offset: usize,
        data: Vec<u8>,
        replaced: Vec<u8>,
        len_before: usize,
    },
    Truncate {
        len: usize,
        cut_off: Vec<u8>,
    },
}

#[derive(Debug, Default)]
struct File {
    data: Vec<u8>,
    unsynced: Vec<Unsynced>,
}

#[derive(Debug, Default)]
struct Locks {
    shared: HashSet<u64>,
    reserved: Option<u64>,
    pending: Option<u64>,
    exclusive: Option<u64>,
}

/// A WAL index: its regions (never moved once handed out) and slot locks.
#[derive(Debug, Default)]
struct Shm {
    regions: Vec<Box<[u8]>>,
    shared: [HashSet<u64>; 8],
    exclusive: [Option<u64>; 8],
    /// Handles that mapped it.
    users: HashSet<u64>,
}

/// A cut waiting for the `left`th write, truncation or sync of a file under `dir`.
struct Armed {
    dir: String,
    to: String,
    left: u64,
    seed: u64,
    on_cut: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Armed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Armed")
            .field("dir", &self.dir)
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Disk {
    armed: Option<Armed>,
    fired: Option<CutReport>,
    /// Ordered, so a cut's random draws go to the files in the same order every run.
    files: BTreeMap<String, File>,
    locks: HashMap<String, Locks>,
    shm: HashMap<String, Shm>,
    next_handle: u64,
    /// Unsynced writes and truncations so far, and syncs.
    writes: u64,
    syncs: u64,
}

/// An open file.
#[derive(Debug)]
pub struct Handle {
    id: u64,
    path: String,
    readonly: bool,
    delete_on_close: bool,
    level: LockLevel,
}

impl VfsHandle for Handle {
    fn readonly(&self) -> bool {
        self.readonly
    }
    fn in_memory(&self) -> bool {
        false
    }
}

/// The VFS and the test's handle on it (both share the in-memory disk).
#[derive(Debug, Clone, Default)]
pub struct PowerCut {
    disk: Arc<Mutex<Disk>>,
}

/// What a cut kept of the unsynced writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    pub files: usize,
    pub unsynced: usize,
    pub kept: usize,
    pub torn: usize,
    pub lost: usize,
}

impl CutReport {
    /// Adds another cut's figures.
    pub fn add(&mut self, other: CutReport) {
        self.files += other.files;
        self.unsynced += other.unsynced;
        self.kept += other.kept;
        self.torn += other.torn;
        self.lost += other.lost;
    }
}

impl PowerCut {
    /// Registers the VFS as the process's default (once; later calls answer the same one).
    pub fn install() -> Result<Self, String> {
        static INSTALLED: OnceLock<Result<PowerCut, String>> = OnceLock::new();
        INSTALLED
            .get_or_init(|| {
                let vfs = PowerCut::default();
                let name = CString::new("powercut").map_err(|e| e.to_string())?;
                register_static(name, vfs.clone(), RegisterOpts { make_default: true })
                    .map_err(|code| format!("registering the VFS: SQLite error {code}"))?;
                Ok(vfs)
            })
            .clone()
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Unsynced writes and syncs so far.
    pub fn counts(&self) -> (u64, u64) {
        let d = self.disk();
        (d.writes, d.syncs)
    }

    /// The power fails: the files under `dir` as the disk holds them afterwards, copied under
    /// `to` (same names). `choose(n)` draws a number below `n`, deciding for each unsynced
    /// write whether it was lost (0), torn (1) or kept (2 and up, out of 10). The running files
    /// are left as they are.
    pub fn cut(&self, dir: &str, to: &str, choose: impl FnMut(u64) -> u64) -> CutReport {
        self.disk().cut(dir, to, choose)
    }

    /// Arms a cut of `dir` into `to` at the `after`th write, truncation or sync of a file under
    /// `dir` (counting from now), right after that operation: a power failure at an exact
    /// point of the I/O. `on_cut` runs at that instant; [`PowerCut::fired`] answers once it
    /// has happened.
    pub fn arm(
        &self,
        dir: &str,
        to: &str,
        after: u64,
        seed: u64,
        on_cut: impl FnOnce() + Send + 'static,
    ) {
        let mut d = self.disk();
        d.fired = None;
        d.armed = Some(Armed {
            dir: dir.to_owned(),
            to: to.to_owned(),
            left: after.max(1),
            seed,
            on_cut: Box::new(on_cut),
        });
    }

    /// The report of the armed cut, once it happened.
    pub fn fired(&self) -> Option<CutReport> {
        self.disk().fired.take()
    }

    /// Disarms a cut that has not happened.
    pub fn disarm(&self) {
        self.disk().armed = None;
    }
    /// Forgets every file under `dir` (a run that is over).
    pub fn forget(&self, dir: &str) {
        let dir = under(dir);
        let mut d = self.disk();
        d.files.retain(|p, _| !p.starts_with(&dir));
        // A WAL index still mapped by a connection stays: SQLite holds pointers into it.
        d.shm
            .retain(|p, shm| !p.starts_with(&dir) || !shm.users.is_empty());
        d.locks.retain(|p, _| !p.starts_with(&dir));
    }
}

impl Disk {
    /// See [`PowerCut::cut`].
    fn cut(&mut self, dir: &str, to: &str, mut choose: impl FnMut(u64) -> u64) -> CutReport {
        let mut report = CutReport::default();
        let mut images = Vec::new();
        let dir = under(dir);
        for (path, file) in self.files.iter().filter(|(p, _)| p.starts_with(&dir)) {
            report.files += 1;
            // Take every unsynced change back, newest first: what was synced.
            let mut image = file.data.clone();
            for u in file.unsynced.iter().rev() {
                match u {
                    Unsynced::Write {
                        offset,
                        replaced,
                        len_before,
                        ..
                    } => {
                        image[*offset..*offset + replaced.len()].copy_from_slice(replaced);
                        image.truncate(*len_before);
                    }
                    Unsynced::Truncate { len, cut_off } => {
                        image.truncate(*len);
                        image.extend_from_slice(cut_off);
                    }
                }
            }
            // Then what of each unsynced change reached the platter, oldest first.
            for u in &file.unsynced {
                report.unsynced += 1;
                match u {
                    Unsynced::Write { offset, data, .. } => {
                        let n = match choose(10) {
                            0..=3 => {
                                report.lost += 1;
                                continue;
                            }
                            4 if data.len() > SECTOR => {
                                report.torn += 1;
                                let sectors = data.len().div_ceil(SECTOR) as u64;
                                SECTOR * (1 + choose(sectors - 1) as usize)
                            }
                            _ => {
                                report.kept += 1;
                                data.len()
                            }
                        }
                        .min(data.len());
                        if image.len() < offset + n {
                            image.resize(offset + n, 0);
                        }
                        image[*offset..*offset + n].copy_from_slice(&data[..n]);
                    }
                    Unsynced::Truncate { len, .. } => {
                        if choose(2) == 0 {
                            report.lost += 1;
                        } else {
                            report.kept += 1;
                            image.truncate(*len);
                        }
                    }
                }
            }
            let name = format!("{}{}", under(to), &path[dir.len()..]);
            images.push((name, image));
        }
        for (name, data) in images {
            self.files.insert(
                name,
                File {
                    data,
                    unsynced: Vec::new(),
                },
            );
        }
        report
    }

    /// Counts an operation on `path`; fires the armed cut when its count is reached.
    fn count_op(&mut self, path: &str) {
        let due = match self.armed.as_mut() {
            Some(a) if path.starts_with(&under(&a.dir)) => {
                a.left -= 1;
                a.left == 0
            }
            _ => false,
        };
        if due && let Some(a) = self.armed.take() {
            let mut rng = a.seed;
            let report = self.cut(&a.dir, &a.to, |n| {
                rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = rng;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) % n.max(1)
            });
            (a.on_cut)();
            self.fired = Some(report);
        }
    }
}

/// `dir` as a prefix of the paths inside it (so `agent-1` does not take in `agent-10`).
fn under(dir: &str) -> String {
    format!("{}/", dir.trim_end_matches('/'))
}

fn busy<T>() -> VfsResult<T> {
    Err(vars::SQLITE_BUSY)
}

impl Vfs for PowerCut {
    type Handle = Handle;

    fn open(&self, path: Option<&str>, opts: OpenOpts) -> VfsResult<Handle> {
        let mut d = self.disk();
        d.next_handle += 1;
        let id = d.next_handle;
        let path = path.map_or_else(|| format!("/powercut-temp/{id}"), str::to_owned);
        let exists = d.files.contains_key(&path);
        let mode = opts.mode();
        if !exists {
            if mode.is_readonly()
                || matches!(
                    mode,
                    sqlite_plugin::flags::OpenMode::ReadWrite {
                        create: sqlite_plugin::flags::CreateMode::None
                    }
                )
            {
                return Err(vars::SQLITE_CANTOPEN);
            }
            // Creating a file is taken as durable at once (as if its directory were synced).
            d.files.insert(path.clone(), File::default());
        } else if mode.must_create() {
            return Err(vars::SQLITE_CANTOPEN);
        }
        Ok(Handle {
            id,
            path,
            readonly: mode.is_readonly(),
            delete_on_close: opts.delete_on_close(),
            level: LockLevel::Unlocked,
        })
    }

    fn delete(&self, path: &str) -> VfsResult<()> {
        let mut d = self.disk();
        d.files.remove(path);
        Ok(())
    }

    fn access(&self, path: &str, _flags: AccessFlags) -> VfsResult<bool> {
        Ok(self.disk().files.contains_key(path))
    }

    fn file_size(&self, h: &mut Handle) -> VfsResult<usize> {
        Ok(self.disk().files.get(&h.path).map_or(0, |f| f.data.len()))
    }

    fn truncate(&self, h: &mut Handle, size: usize) -> VfsResult<()> {
        let mut d = self.disk();
        let f = d.files.get_mut(&h.path).ok_or(vars::SQLITE_IOERR)?;
        if size < f.data.len() {
            let cut_off = f.data.split_off(size);
            f.unsynced.push(Unsynced::Truncate { len: size, cut_off });
            d.writes += 1;
        }
        d.count_op(&h.path);
        Ok(())
    }

    fn write(&self, h: &mut Handle, offset: usize, data: &[u8]) -> VfsResult<usize> {
        let mut d = self.disk();
        let f = d.files.get_mut(&h.path).ok_or(vars::SQLITE_IOERR)?;
        let len_before = f.data.len();
        let end = offset + data.len();
        let replaced = f.data[offset.min(len_before)..end.min(len_before)].to_vec();
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[offset..end].copy_from_slice(data);
        f.unsynced.push(Unsynced::Write {
            offset,
            data: data.to_vec(),
            replaced,
            len_before,
        });
        d.writes += 1;
        d.count_op(&h.path);
        Ok(data.len())
    }

    fn read(&self, h: &mut Handle, offset: usize, out: &mut [u8]) -> VfsResult<usize> {
        let d = self.disk();
        let f = d.files.get(&h.path).ok_or(vars::SQLITE_IOERR)?;
        let start = offset.min(f.data.len());
        let end = (offset + out.len()).min(f.data.len());
        out[..end - start].copy_from_slice(&f.data[start..end]);
        Ok(end - start)
    }

    fn sync(&self, h: &mut Handle) -> VfsResult<()> {
        let mut d = self.disk();
        if let Some(f) = d.files.get_mut(&h.path) {
            f.unsynced.clear();
        }
        d.syncs += 1;
        d.count_op(&h.path);
        Ok(())
    }

    fn lock(&self, h: &mut Handle, level: LockLevel) -> VfsResult<()> {
        let mut d = self.disk();
        let l = d.locks.entry(h.path.clone()).or_default();
        let other = |owner: Option<u64>| owner.is_some_and(|o| o != h.id);
        match level {
            LockLevel::Unlocked => {}
            LockLevel::Shared => {
                if other(l.exclusive) || other(l.pending) {
                    return busy();
                }
                l.shared.insert(h.id);
            }
            LockLevel::Reserved => {
                if other(l.reserved) || other(l.pending) || other(l.exclusive) {
                    return busy();
                }
                l.reserved = Some(h.id);
            }
            LockLevel::Pending | LockLevel::Exclusive => {
                if other(l.exclusive) || other(l.pending) {
                    return busy();
                }
                l.pending = Some(h.id);
                if level == LockLevel::Exclusive {
                    if l.shared.iter().any(|s| *s != h.id) {
                        return busy();
                    }
                    l.exclusive = Some(h.id);
                }
            }
        }
        h.level = h.level.max(level);
        Ok(())
    }

    fn unlock(&self, h: &mut Handle, level: LockLevel) -> VfsResult<()> {
        let mut d = self.disk();
        let l = d.locks.entry(h.path.clone()).or_default();
        let mine = |owner: &mut Option<u64>| {
            if *owner == Some(h.id) {
                *owner = None;
            }
        };
        if level < LockLevel::Exclusive {
            mine(&mut l.exclusive);
        }
        if level < LockLevel::Pending {
            mine(&mut l.pending);
        }
        if level < LockLevel::Reserved {
            mine(&mut l.reserved);
        }
        if level < LockLevel::Shared {
            l.shared.remove(&h.id);
        }
        h.level = level;
        Ok(())
    }

    fn check_reserved_lock(&self, h: &mut Handle) -> VfsResult<bool> {
        let d = self.disk();
        Ok(d.locks.get(&h.path).is_some_and(|l| {
            [l.reserved, l.pending, l.exclusive]
                .iter()
                .any(|o| o.is_some_and(|o| o != h.id))
        }))
    }

    fn close(&self, h: Handle) -> VfsResult<()> {
        let mut d = self.disk();
        if let Some(l) = d.locks.get_mut(&h.path) {
            l.shared.remove(&h.id);
            for owner in [&mut l.reserved, &mut l.pending, &mut l.exclusive] {
                if *owner == Some(h.id) {
                    *owner = None;
                }
            }
        }
        if h.delete_on_close {
            d.files.remove(&h.path);
        }
        Ok(())
    }

    fn sector_size(&self, _h: &mut Handle) -> VfsResult<i32> {
        Ok(SECTOR as i32)
    }

    /// Nothing is promised: not atomic, not sequential, no safe overwrite. SQLite then syncs
    /// and checksums as it must on a real disk of unknown quality.
    fn device_characteristics(&self, _h: &mut Handle) -> VfsResult<i32> {
        Ok(0)
    }

    fn shm_map(
        &self,
        h: &mut Handle,
        region: usize,
        size: usize,
        extend: bool,
    ) -> VfsResult<Option<NonNull<u8>>> {
        let mut d = self.disk();
        let shm = d.shm.entry(h.path.clone()).or_default();
        shm.users.insert(h.id);
        while shm.regions.len() <= region {
            if !extend {
                return Ok(None);
            }
            shm.regions.push(vec![0u8; size].into_boxed_slice());
        }
        Ok(NonNull::new(shm.regions[region].as_mut_ptr()))
    }

    fn shm_lock(
        &self,
        h: &mut Handle,
        offset: u32,
        count: u32,
        mode: ShmLockMode,
    ) -> VfsResult<()> {
        let mut d = self.disk();
        let shm = d.shm.entry(h.path.clone()).or_default();
        let slots = offset as usize..(offset + count) as usize;
        if slots.end > 8 {
            return Err(vars::SQLITE_IOERR);
        }
        match mode {
            ShmLockMode::LockShared => {
                if slots
                    .clone()
                    .any(|s| shm.exclusive[s].is_some_and(|o| o != h.id))
                {
                    return busy();
                }
                for s in slots {
                    shm.shared[s].insert(h.id);
                }
            }
            ShmLockMode::LockExclusive => {
                if slots.clone().any(|s| {
                    shm.exclusive[s].is_some_and(|o| o != h.id)
                        || shm.shared[s].iter().any(|o| *o != h.id)
                }) {
                    return busy();
                }
                for s in slots {
                    shm.exclusive[s] = Some(h.id);
                }
            }
            ShmLockMode::UnlockShared => {
                for s in slots {
                    shm.shared[s].remove(&h.id);
                }
            }
            ShmLockMode::UnlockExclusive => {
                for s in slots {
                    if shm.exclusive[s] == Some(h.id) {
                        shm.exclusive[s] = None;
                    }
                }
            }
        }
        Ok(())
    }

    fn shm_barrier(&self, _h: &mut Handle) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn shm_unmap(&self, h: &mut Handle, delete: bool) -> VfsResult<()> {
        let mut d = self.disk();
        if let Some(shm) = d.shm.get_mut(&h.path) {
            shm.users.remove(&h.id);
            for s in 0..8 {
                shm.shared[s].remove(&h.id);
                if shm.exclusive[s] == Some(h.id) {
                    shm.exclusive[s] = None;
                }
            }
            // The regions stay while another connection maps them (SQLite holds pointers).
            if delete && shm.users.is_empty() {
                d.shm.remove(&h.path);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlite_plugin::vars::{SQLITE_OPEN_CREATE, SQLITE_OPEN_MAIN_DB, SQLITE_OPEN_READWRITE};

    fn file(vfs: &PowerCut, path: &str) -> Vec<u8> {
        vfs.disk()
            .files
            .get(path)
            .map(|f| f.data.clone())
            .expect("file")
    }

    /// Not registered with SQLite: the layer's own bookkeeping, called as SQLite would.
    #[test]
    fn a_cut_keeps_what_was_synced_and_chooses_among_the_rest() {
        let vfs = PowerCut::default();
        let opts = OpenOpts::new(SQLITE_OPEN_MAIN_DB | SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
        let mut h = vfs.open(Some("/run/db"), opts).expect("open");
        vfs.write(&mut h, 0, &[1; 1024]).expect("write");
        vfs.sync(&mut h).expect("sync");
        vfs.write(&mut h, 512, &[2; 1024]).expect("write");
        vfs.truncate(&mut h, 1200).expect("truncate");
        vfs.write(&mut h, 2048, &[3; 10]).expect("write");
        assert_eq!(file(&vfs, "/run/db").len(), 2058);

        let lost = vfs.cut("/run/", "/lost/", |_| 0);
        assert_eq!((lost.unsynced, lost.lost), (3, 3));
        assert_eq!(
            file(&vfs, "/lost/db"),
            vec![1; 1024],
            "only the synced write"
        );

        let kept = vfs.cut("/run/", "/kept/", |n| n - 1);
        assert_eq!(kept.kept, 3);
        assert_eq!(file(&vfs, "/kept/db"), file(&vfs, "/run/db"), "every write");

        // The first unsynced write torn after its first sector, the rest lost.
        let mut first = true;
        let torn = vfs.cut("/run/", "/torn/", |n| {
            if n == 10 && std::mem::take(&mut first) {
                4
            } else {
                0
            }
        });
        assert_eq!(torn.torn, 1);
        let mut want = vec![1u8; 1024];
        want[512..1024].copy_from_slice(&[2; 512]);
        assert_eq!(file(&vfs, "/torn/db"), want);

        vfs.sync(&mut h).expect("sync");
        let clean = vfs.cut("/run/", "/clean/", |_| 0);
        assert_eq!(clean.unsynced, 0);
        assert_eq!(file(&vfs, "/clean/db"), file(&vfs, "/run/db"));
    }
}
