//! Durable raft state behind one small trait.
//!
//! A [`Store`] holds what raft needs to survive a restart: the hard state (term,
//! vote, commit), the conf state (the fixed voter set), the log entries after the
//! latest snapshot, and that snapshot (the serialized
//! [`ClusterState`](super::ClusterState) at an index and term).
//!
//! Reads are infallible: both implementations keep the whole (compacted, so
//! small) log in memory, and [`SledStore`] writes through to disk. raft-rs
//! panics on some storage read errors; keeping reads in memory means a disk
//! error can only surface on a write, where [`RaftNode`](super::RaftNode) stops
//! cleanly instead.
//!
//! * [`MemStore`]: memory only; clones share the same state, so a simulation
//!   keeps a clone as the node's "disk" and rebuilds a crashed node from it.
//! * [`SledStore`]: a sled 0.34 database in a directory; every write is one
//!   atomic sled batch, [`Store::sync`] flushes it to disk.
//!
//! # On-disk format of [`SledStore`]
//!
//! One sled tree (the default one), keys:
//!
//! | key | value |
//! |---|---|
//! | `m/format` | `concord-raft-1` |
//! | `m/hard_state` | protobuf `eraftpb.HardState` |
//! | `m/conf_state` | protobuf `eraftpb.ConfState` |
//! | `m/snapshot` | protobuf `eraftpb.Snapshot` (data = bincode 2 of `ClusterState`) |
//! | `e/` + index (u64 big-endian, so keys sort by index) | protobuf `eraftpb.Entry` |
//!
//! Opening checks the format key, decodes everything and checks that the entries
//! are contiguous and follow the snapshot; anything else is
//! [`MembershipError::Corrupt`].

use std::path::Path;
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

use super::MembershipError;

/// What raft needs persisted. Reads come from memory and cannot fail.
pub trait Store: Send {
    fn hard_state(&self) -> HardState;
    fn conf_state(&self) -> ConfState;
    /// The latest snapshot (index 0 if there is none).
    fn snapshot(&self) -> Snapshot;
    /// Index of the first entry held: the snapshot's index + 1.
    fn first_index(&self) -> u64;
    /// Index of the last entry held, or the snapshot's index if there is none.
    fn last_index(&self) -> u64;
    /// Term of entry `index`, for `index` in `[first_index - 1, last_index]`
    /// (the snapshot's term for `first_index - 1`).
    fn term(&self, index: u64) -> Option<u64>;
    /// Entries `[low, high)`, at most `max_size` bytes but at least one; `None` if
    /// the range is not all held.
    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>>;

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), MembershipError>;
    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), MembershipError>;
    /// Appends entries; entries held at or after `entries[0].index` are replaced
    /// (raft's log truncation). Entries at or before the snapshot are skipped.
    fn append(&mut self, entries: &[Entry]) -> Result<(), MembershipError>;
    /// Installs a snapshot received from the leader: it replaces the whole log,
    /// the conf state, and the commit index.
    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), MembershipError>;
    /// Records a snapshot of our own applied state and drops the entries it covers.
    fn compact(&mut self, snap: &Snapshot) -> Result<(), MembershipError>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> Result<(), MembershipError>;
}

/// The in-memory image both stores keep.
#[derive(Clone, Debug, Default)]
struct MemLog {
    hs: HardState,
    cs: ConfState,
    snap: Snapshot,
    /// Contiguous, starting at `snap.index + 1`.
    entries: Vec<Entry>,
}

impl MemLog {
    fn snap_index(&self) -> u64 {
        self.snap.get_metadata().index
    }

    fn first_index(&self) -> u64 {
        self.snap_index() + 1
    }

    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.snap_index(), |e| e.index)
    }

    fn term(&self, index: u64) -> Option<u64> {
        if index == self.snap_index() {
            return Some(self.snap.get_metadata().term);
        }
        if index < self.first_index() || index > self.last_index() {
            return None;
        }
        self.entries.get((index - self.first_index()) as usize).map(|e| e.term)
    }

    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>> {
        if low < self.first_index() || high > self.last_index() + 1 || low > high {
            return None;
        }
        let from = (low - self.first_index()) as usize;
        let to = (high - self.first_index()) as usize;
        let mut out = Vec::new();
        let mut size = 0u64;
        for e in &self.entries[from..to] {
            size += u64::from(e.compute_size());
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    /// The entries to keep from `entries` (those after the snapshot), and the
    /// index from which held entries are replaced. Errors on a gap.
    fn plan_append<'a>(&self, entries: &'a [Entry]) -> Result<&'a [Entry], MembershipError> {
        let Some(first) = entries.first() else {
            return Ok(entries);
        };
        if first.index > self.last_index() + 1 {
            return Err(MembershipError::Missing(format!(
                "append at {} leaves a gap after {}",
                first.index,
                self.last_index()
            )));
        }
        let skip = self.first_index().saturating_sub(first.index) as usize;
        Ok(entries.get(skip..).unwrap_or(&[]))
    }

    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        let keep = (first.index - self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) {
        let meta = snap.get_metadata();
        self.hs.term = self.hs.term.max(meta.term);
        self.hs.commit = meta.index;
        self.cs = meta.get_conf_state().clone();
        self.entries.clear();
        self.snap = snap.clone();
    }

    fn compact(&mut self, snap: &Snapshot) {
        let index = snap.get_metadata().index;
        let drop = (index.saturating_sub(self.snap_index()) as usize).min(self.entries.len());
        self.entries.drain(..drop);
        self.snap = snap.clone();
    }

    fn check_compact(&self, snap: &Snapshot) -> Result<(), MembershipError> {
        let index = snap.get_metadata().index;
        if index <= self.snap_index() || index > self.last_index() {
            return Err(MembershipError::Missing(format!(
                "compaction to {index} outside ({}, {}]",
                self.snap_index(),
                self.last_index()
            )));
        }
        Ok(())
    }
}

/// Reads shared by both stores.
macro_rules! reads_from_memlog {
    ($log:ident, $self:ident => $get:expr) => {
        fn hard_state(&$self) -> HardState {
            let $log = $get;
            $log.hs.clone()
        }
        fn conf_state(&$self) -> ConfState {
            let $log = $get;
            $log.cs.clone()
        }
        fn snapshot(&$self) -> Snapshot {
            let $log = $get;
            $log.snap.clone()
        }
        fn first_index(&$self) -> u64 {
            let $log = $get;
            $log.first_index()
        }
        fn last_index(&$self) -> u64 {
            let $log = $get;
            $log.last_index()
        }
        fn term(&$self, index: u64) -> Option<u64> {
            let $log = $get;
            $log.term(index)
        }
        fn entries(&$self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>> {
            let $log = $get;
            $log.entries(low, high, max_size)
        }
    };
}

/// A memory-only store. Clones share the same state (the simulation's "disk"):
/// what was written, and what was synced. [`MemStore::crash`] forgets the
/// writes since the last [`Store::sync`], as a power cut would.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    log: Arc<Mutex<MemLog>>,
    synced: Arc<Mutex<MemLog>>,
}

fn lock(log: &Mutex<MemLog>) -> std::sync::MutexGuard<'_, MemLog> {
    // A panic while holding the lock can only come from a bug elsewhere in a
    // test; the log itself is always left consistent, so poisoning is ignored.
    log.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemLog> {
        lock(&self.log)
    }

    /// Forgets every write since the last sync (the node using this store must
    /// be dropped first: it is the crash).
    pub fn crash(&self) {
        let synced = lock(&self.synced).clone();
        *self.lock() = synced;
    }
}

impl Store for MemStore {
    reads_from_memlog!(log, self => self.lock());

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), MembershipError> {
        self.lock().hs = hs.clone();
        Ok(())
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), MembershipError> {
        self.lock().cs = cs.clone();
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), MembershipError> {
        let mut log = self.lock();
        let entries = log.plan_append(entries)?;
        log.append(entries);
        Ok(())
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), MembershipError> {
        self.lock().apply_snapshot(snap);
        Ok(())
    }

    fn compact(&mut self, snap: &Snapshot) -> Result<(), MembershipError> {
        let mut log = self.lock();
        log.check_compact(snap)?;
        log.compact(snap);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), MembershipError> {
        let live = self.lock().clone();
        *lock(&self.synced) = live;
        Ok(())
    }
}

const FORMAT_KEY: &[u8] = b"m/format";
const FORMAT: &[u8] = b"concord-raft-1";
const HARD_STATE_KEY: &[u8] = b"m/hard_state";
const CONF_STATE_KEY: &[u8] = b"m/conf_state";
const SNAPSHOT_KEY: &[u8] = b"m/snapshot";
const ENTRY_PREFIX: &[u8] = b"e/";

fn entry_key(index: u64) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(ENTRY_PREFIX);
    key[2..].copy_from_slice(&index.to_be_bytes());
    key
}

fn encode<M: protobuf::Message>(what: &str, m: &M) -> Result<Vec<u8>, MembershipError> {
    m.write_to_bytes().map_err(|e| MembershipError::Corrupt(format!("encoding {what}: {e}")))
}

fn decode<M: protobuf::Message>(what: &str, bytes: &[u8]) -> Result<M, MembershipError> {
    M::parse_from_bytes(bytes).map_err(|e| MembershipError::Corrupt(format!("{what}: {e}")))
}

/// How long [`open_db`] waits for a previous holder of the database to let it go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the sled database in `dir`. sled's flusher thread keeps the database's file lock
/// for up to one flush interval after the last handle is dropped, so a store closed and
/// reopened at once (a restarted daemon, a test) can find it still taken: wait for it,
/// for a bounded time, and report a held lock as what it is.
fn open_db(dir: &Path) -> Result<sled::Db, MembershipError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::open(dir) {
            Err(sled::Error::Io(e)) if is_lock_held(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// Whether `e` is sled's "could not acquire lock" (its error wraps the flock `EWOULDBLOCK`
/// in a message, so the message is all there is to go by).
fn is_lock_held(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// The durable store: a sled database, mirrored in memory for reads.
pub struct SledStore {
    db: sled::Db,
    log: MemLog,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").field("log", &self.log).finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (or creates) the store in directory `dir` and loads it.
    pub fn open(dir: &Path) -> Result<Self, MembershipError> {
        let db = open_db(dir)?;
        let log = Self::load(&db)?;
        Ok(SledStore { db, log })
    }

    fn load(db: &sled::Db) -> Result<MemLog, MembershipError> {
        match db.get(FORMAT_KEY)? {
            Some(f) if f.as_ref() == FORMAT => {}
            Some(f) => {
                return Err(MembershipError::Corrupt(format!(
                    "unknown format {:?} (expected {:?})",
                    String::from_utf8_lossy(&f),
                    String::from_utf8_lossy(FORMAT)
                )))
            }
            None if db.is_empty() => {
                db.insert(FORMAT_KEY, FORMAT)?;
                db.flush()?;
                return Ok(MemLog::default());
            }
            None => return Err(MembershipError::Corrupt("format key missing in a non-empty store".into())),
        }
        let mut log = MemLog::default();
        if let Some(b) = db.get(HARD_STATE_KEY)? {
            log.hs = decode("hard state", &b)?;
        }
        if let Some(b) = db.get(CONF_STATE_KEY)? {
            log.cs = decode("conf state", &b)?;
        }
        if let Some(b) = db.get(SNAPSHOT_KEY)? {
            log.snap = decode("snapshot", &b)?;
        }
        for (expect, item) in (log.first_index()..).zip(db.scan_prefix(ENTRY_PREFIX)) {
            let (key, value) = item?;
            let index = key
                .get(2..)
                .and_then(|k| <[u8; 8]>::try_from(k).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| MembershipError::Corrupt(format!("bad entry key {key:?}")))?;
            let entry: Entry = decode(&format!("entry {index}"), &value)?;
            if entry.index != index || index != expect {
                return Err(MembershipError::Corrupt(format!(
                    "entry under key {index} has index {}, expected {expect}",
                    entry.index
                )));
            }
            log.entries.push(entry);
        }
        if log.hs.commit > log.last_index() {
            return Err(MembershipError::Corrupt(format!(
                "commit {} is past the last entry {}",
                log.hs.commit,
                log.last_index()
            )));
        }
        Ok(log)
    }

    /// Adds removals of every held entry in `[from, ..)` to `batch`.
    fn remove_from(&self, batch: &mut sled::Batch, from: u64) {
        let from = from.max(self.log.first_index());
        for index in from..=self.log.last_index() {
            batch.remove(&entry_key(index)[..]);
        }
    }
}

impl Store for SledStore {
    reads_from_memlog!(log, self => &self.log);

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), MembershipError> {
        self.db.insert(HARD_STATE_KEY, encode("hard state", hs)?)?;
        self.log.hs = hs.clone();
        Ok(())
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), MembershipError> {
        self.db.insert(CONF_STATE_KEY, encode("conf state", cs)?)?;
        self.log.cs = cs.clone();
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), MembershipError> {
        let entries = self.log.plan_append(entries)?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        self.remove_from(&mut batch, first.index);
        for e in entries {
            batch.insert(&entry_key(e.index)[..], encode("entry", e)?);
        }
        self.db.apply_batch(batch)?;
        self.log.append(entries);
        Ok(())
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), MembershipError> {
        let mut next = self.log.clone();
        next.apply_snapshot(snap);
        let mut batch = sled::Batch::default();
        self.remove_from(&mut batch, 0);
        batch.insert(SNAPSHOT_KEY, encode("snapshot", snap)?);
        batch.insert(HARD_STATE_KEY, encode("hard state", &next.hs)?);
        batch.insert(CONF_STATE_KEY, encode("conf state", &next.cs)?);
        self.db.apply_batch(batch)?;
        self.log = next;
        Ok(())
    }

    fn compact(&mut self, snap: &Snapshot) -> Result<(), MembershipError> {
        self.log.check_compact(snap)?;
        let mut batch = sled::Batch::default();
        for index in self.log.first_index()..=snap.get_metadata().index {
            batch.remove(&entry_key(index)[..]);
        }
        batch.insert(SNAPSHOT_KEY, encode("snapshot", snap)?);
        self.db.apply_batch(batch)?;
        self.log.compact(snap);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), MembershipError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 3].into(), ..Default::default() }
    }

    fn snapshot(index: u64, term: u64, data: &[u8]) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        s.data = data.to_vec().into();
        s
    }

    fn exercise(store: &mut dyn Store) {
        assert_eq!((store.first_index(), store.last_index()), (1, 0));
        assert_eq!(store.term(0), Some(0));
        store.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        // Truncation: a new entry 2 replaces 2 and 3.
        store.append(&[entry(2, 2)]).unwrap();
        assert_eq!(store.last_index(), 2);
        assert_eq!(store.term(2), Some(2));
        assert!(store.append(&[entry(5, 2)]).is_err(), "gap refused");
        store.append(&[entry(3, 2), entry(4, 3)]).unwrap();
        let got = store.entries(2, 5, None).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(store.entries(2, 5, Some(1)).unwrap().len(), 1, "at least one entry");
        assert!(store.entries(2, 6, None).is_none());
        store.compact(&snapshot(2, 2, b"state@2")).unwrap();
        assert_eq!((store.first_index(), store.last_index()), (3, 4));
        assert_eq!(store.term(2), Some(2));
        assert_eq!(store.term(1), None);
        assert!(store.entries(2, 4, None).is_none());
        assert!(store.compact(&snapshot(9, 3, b"x")).is_err());
        // An append overlapping the snapshot keeps only the new part.
        store.append(&[entry(2, 2), entry(3, 2), entry(4, 3), entry(5, 3)]).unwrap();
        assert_eq!(store.last_index(), 5);
        let hs = HardState { term: 3, vote: 2, commit: 4, ..Default::default() };
        store.set_hard_state(&hs).unwrap();
        store.set_conf_state(&ConfState::from((vec![1, 2, 3], vec![]))).unwrap();
        store.sync().unwrap();
    }

    #[test]
    fn mem_store_log_operations() {
        let mut s = MemStore::new();
        exercise(&mut s);
        let shared = s.clone();
        assert_eq!(shared.last_index(), 5);
        s.apply_snapshot(&snapshot(10, 4, b"leader")).unwrap();
        assert_eq!((shared.first_index(), shared.last_index()), (11, 10));
        assert_eq!(shared.hard_state().commit, 10);
        assert_eq!(shared.hard_state().term, 4);
        // A crash forgets what was not synced.
        shared.crash();
        assert_eq!((s.first_index(), s.last_index()), (3, 5));
        s.append(&[entry(6, 3)]).unwrap();
        s.sync().unwrap();
        s.append(&[entry(7, 3)]).unwrap();
        s.crash();
        assert_eq!(s.last_index(), 6);
    }

    #[test]
    fn sled_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStore::open(dir.path()).unwrap();
            exercise(&mut s);
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (3, 5));
        assert_eq!(s.hard_state().vote, 2);
        assert_eq!(s.hard_state().commit, 4);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(&s.snapshot().data[..], b"state@2");
        assert_eq!(s.entries(3, 6, None).unwrap(), vec![entry(3, 2), entry(4, 3), entry(5, 3)]);
        drop(s);
        {
            let mut s = SledStore::open(dir.path()).unwrap();
            s.apply_snapshot(&snapshot(10, 4, b"leader")).unwrap();
            s.append(&[entry(11, 4)]).unwrap();
            s.sync().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (11, 11));
        assert_eq!(s.hard_state().commit, 10);
        assert_eq!(&s.snapshot().data[..], b"leader");
    }

    #[test]
    fn open_waits_for_the_previous_holder_to_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let held = open_db(dir.path()).unwrap();
        // While it is held, a second open is refused by sled's file lock ...
        assert!(matches!(sled::open(dir.path()), Err(sled::Error::Io(ref e)) if is_lock_held(e)));
        // ... and open_db waits until the holder lets go.
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        let s = SledStore::open(dir.path()).unwrap();
        holder.join().unwrap();
        assert_eq!(s.last_index(), 0);
    }

    #[test]
    fn sled_store_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStore::open(dir.path()).unwrap();
            s.append(&[entry(1, 1), entry(2, 1)]).unwrap();
            s.sync().unwrap();
            s.db.insert(HARD_STATE_KEY, &b"\xff\xff\xff"[..]).unwrap();
            s.db.flush().unwrap();
        }
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, MembershipError::Corrupt(_)), "{err}");
        {
            let db = open_db(dir.path()).unwrap();
            db.remove(HARD_STATE_KEY).unwrap();
            db.remove(entry_key(1)).unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("expected 1"), "{err}");
        {
            let db = open_db(dir.path()).unwrap();
            db.insert(FORMAT_KEY, &b"other"[..]).unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(SledStore::open(dir.path()), Err(MembershipError::Corrupt(_))));
    }
}
