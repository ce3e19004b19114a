//! The kernel's caches above the mount ([`KernelCache`]): dropping an inode's
//! attributes and pages and the names the kernel keeps, through the fuse-notify threads
//! in a cluster (a notification must never run on a FUSE request thread, nor be waited
//! for while a FUSE request may hold the lock it needs: docs/internals/glocks.md), and
//! the record of which names the kernel was given per directory since its glock last
//! left this node.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap as HashMap;

use super::{Filesystem, KernelCache};

/// One job of the fuse-notify threads: names to forget (`inval_entry`, positive or
/// negative), in order, then maybe an inode's attributes and pages (`inval_inode`).
/// One thread runs a job from start to end, so a demote's names go before its
/// directory inode. Or a range of a file's pages to write back and drop
/// (`write_back_range`). `track`: the inode whose [`Outstanding`] count the job holds.
#[derive(Debug, Default)]
pub(super) struct Notice {
    pub(super) entries: Vec<(u64, Box<[u8]>)>,
    pub(super) inode: Option<u64>,
    pub(super) range: Option<(u64, u64, u64)>,
    pub(super) track: Option<u64>,
}

/// Run once a job was delivered, if its sender waits for it.
pub(super) type Delivered = Box<dyn FnOnce() + Send>;

/// The fuse-notify threads' two queues: jobs with names (a directory's demote) and
/// jobs without (an inode's attributes and pages, a range's write-back). An
/// `inval_entry` waits for its directory's lock, which a FUSE request in that
/// directory may hold for a long while (waiting for a glock); page invalidations of
/// files must not queue behind it: a file's pages left stale past its demote would be
/// read as the file's content.
pub(super) struct NotifyQueue {
    names: parking_lot::Mutex<Sender<(Notice, Option<Delivered>)>>,
    pages: parking_lot::Mutex<Sender<(Notice, Option<Delivered>)>>,
}

impl NotifyQueue {
    /// Queues `notice`; gives it back if its threads are gone.
    fn send(&self, notice: Notice, done: Option<Delivered>) -> Result<(), (Notice, Option<Delivered>)> {
        let q = if notice.entries.is_empty() { &self.pages } else { &self.names };
        q.lock().send((notice, done)).map_err(|e| e.0)
    }
}

impl std::fmt::Debug for NotifyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyQueue")
    }
}

/// How many fuse-notify threads serve each queue. A notification that waits for a
/// directory or page lock held by a FUSE request (which itself waits for a glock)
/// holds up only its own thread; the other demotes' notifications go on through the
/// others instead of queueing behind it.
const NOTIFY_THREADS: usize = 4;

/// Starts `NOTIFY_THREADS` threads named `name-N` serving one queue; how many started.
fn notify_threads(
    k: &Arc<dyn KernelCache>,
    outstanding: &Arc<Outstanding>,
    name: &str,
) -> (Sender<(Notice, Option<Delivered>)>, usize) {
    let (tx, rx) = std::sync::mpsc::channel::<(Notice, Option<Delivered>)>();
    let rx = Arc::new(parking_lot::Mutex::new(rx));
    let mut started = 0;
    for i in 0..NOTIFY_THREADS {
        let kc = k.clone();
        let rx = rx.clone();
        let outstanding = outstanding.clone();
        let spawned = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || loop {
            // The lock is held only to take one job, never while running it.
            let job = rx.lock().recv();
            let Ok((notice, done)) = job else { return };
            for (dir, name) in &notice.entries {
                kc.inval_entry(*dir, name);
            }
            if let Some(ino) = notice.inode {
                kc.inval_inode(ino);
            }
            if let Some((ino, start, end)) = notice.range {
                kc.write_back_range(ino, start, end);
            }
            if let Some(ino) = notice.track {
                outstanding.done(ino);
            }
            if let Some(done) = done {
                done();
            }
        });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => tracing::warn!(error = %e, "a {name} thread could not start"),
        }
    }
    (tx, started)
}

/// How long after its glock last left this node a directory counts as contended: its
/// names are then given to the kernel with a zero entry timeout
/// ([`Filesystem::note_entries`]), and every path walk through such a name costs a
/// LOOKUP. Short, so that a directory another node touched once (a top-level
/// directory where every node makes its own) is soon cached again; long enough that
/// a directory that moves between nodes several times a second stays contended.
pub(crate) const CONTENDED_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Per directory: how many times its glock left this node (its epoch) and when it last
/// did, and the names the kernel was given since (and may keep for the entry TTL).
#[derive(Debug, Default)]
pub(super) struct KernelNames {
    epoch: HashMap<u64, u64>,
    left_at: HashMap<u64, std::time::Instant>,
    names: HashMap<u64, std::collections::HashSet<Box<[u8]>>>,
}

impl KernelNames {
    /// Directory `dir`'s glock leaves this node: its epoch goes up, and the names the
    /// kernel was given in it since the last time are returned (to be invalidated),
    /// the set starting empty again.
    pub(super) fn dir_left(&mut self, dir: u64) -> Vec<(u64, Box<[u8]>)> {
        *self.epoch.entry(dir).or_insert(0) += 1;
        let now = std::time::Instant::now();
        if self.left_at.len() >= 4096 {
            self.left_at.retain(|_, t| now.duration_since(*t) < CONTENDED_FOR);
        }
        self.left_at.insert(dir, now);
        self.names.remove(&dir).map_or_else(Vec::new, |set| set.into_iter().map(|n| (dir, n)).collect())
    }

    /// Whether `dir`'s glock left this node within [`CONTENDED_FOR`].
    fn contended(&self, dir: u64) -> bool {
        self.left_at.get(&dir).is_some_and(|t| t.elapsed() < CONTENDED_FOR)
    }
}

/// Per inode: the notifications sent for it that the kernel has not confirmed yet (a
/// demote's, and the names a rename gave the kernel while the directory's glock was
/// leaving), so that a demote waits for all of them, not only its own; and what to
/// call once none is left (the glock's loan ends: [`crate::lock::LockModule::kernel_confirmed`]).
#[derive(Default)]
pub(super) struct Outstanding {
    state: parking_lot::Mutex<OutstandingState>,
    cond: parking_lot::Condvar,
}

type Watcher = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct OutstandingState {
    count: HashMap<u64, usize>,
    watchers: HashMap<u64, Watcher>,
}

impl std::fmt::Debug for Outstanding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outstanding({} inodes)", self.state.lock().count.len())
    }
}

impl Outstanding {
    fn add(&self, ino: u64) {
        *self.state.lock().count.entry(ino).or_insert(0) += 1;
    }

    /// One notification for `ino` was delivered (or could not be sent).
    fn done(&self, ino: u64) {
        let watcher = {
            let mut st = self.state.lock();
            let Some(n) = st.count.get_mut(&ino) else { return };
            *n -= 1;
            if *n > 0 {
                return;
            }
            st.count.remove(&ino);
            self.cond.notify_all();
            st.watchers.remove(&ino)
        };
        if let Some(w) = watcher {
            w();
        }
    }

    /// Waits until nothing is outstanding for `ino` (true), or `give_up(waited)`
    /// (false).
    fn wait(&self, ino: u64, give_up: &dyn Fn(Duration) -> bool) -> bool {
        let start = Instant::now();
        loop {
            {
                let mut st = self.state.lock();
                if !st.count.contains_key(&ino) {
                    return true;
                }
                self.cond.wait_for(&mut st, Duration::from_millis(1));
                if !st.count.contains_key(&ino) {
                    return true;
                }
            }
            // Without the lock: `give_up` may ask the glock runtime.
            if give_up(start.elapsed()) {
                return false;
            }
        }
    }

    /// Calls `w` once nothing is outstanding for `ino` (at once if nothing is). A
    /// later watcher for the same inode replaces an earlier one.
    fn watch(&self, ino: u64, w: Watcher) {
        let mut st = self.state.lock();
        if st.count.contains_key(&ino) {
            st.watchers.insert(ino, w);
            return;
        }
        drop(st);
        w();
    }
}

/// How long a demote waits for the kernel to drop an inode's names, attributes and
/// pages.
const KERNEL_INVAL_WAIT: Duration = Duration::from_millis(200);
/// How long it waits while local requests wait for the same glock: they may hold the
/// kernel lock (directory or page) the notification needs, and only get on once the
/// demote reports the invalidation unconfirmed and the glock is lent to them.
const KERNEL_INVAL_STUCK: Duration = Duration::from_millis(5);

impl Filesystem {
    /// Drops everything cached for `ino`: its metadata blocks, its file data and the
    /// kernel's attributes and pages (through [`KernelCache`]). The next access reads
    /// the device (or the journal). What a glock demote does in the cluster mode; call
    /// it while no operation on `ino` is running.
    pub fn drop_caches(&self, ino: u64) {
        self.core.lock().drop_inode(ino);
        if let Some(k) = self.kernel.get() {
            k.inval_inode(ino);
        }
    }

    /// Drops the kernel's cached lookup of `name` in `parent`, and what Concord caches
    /// for `parent`.
    pub fn drop_entry(&self, parent: u64, name: &[u8]) {
        self.core.lock().drop_inode(parent);
        if let Some(k) = self.kernel.get() {
            k.inval_entry(parent, name);
        }
    }

    /// Connects the kernel's caches (once, when the FUSE session is up).
    pub fn set_kernel_cache(&self, k: Arc<dyn KernelCache>) {
        if self.is_cluster() {
            // Demotes reach the kernel through threads of their own: a notification
            // can wait on a page or inode lock that a FUSE request holds while it waits
            // for the glock being demoted (docs/internals/glocks.md).
            let (names, n) = notify_threads(&k, &self.outstanding, "fuse-notify");
            let (pages, p) = notify_threads(&k, &self.outstanding, "fuse-pages");
            if n > 0 && p > 0 {
                let q = NotifyQueue { names: parking_lot::Mutex::new(names), pages: parking_lot::Mutex::new(pages) };
                let _ = self.notify.set(q);
            } else {
                tracing::warn!("no fuse-notify threads: kernel invalidations run inline");
            }
        }
        let _ = self.kernel.set(k);
    }

    /// Tells the kernel to forget `names` (directory, name) and then inode `ino`'s
    /// attributes and pages, through the fuse-notify threads in a cluster, and waits
    /// until the kernel confirmed that and every other notification for `ino` still
    /// outstanding. True once it did; false after [`KERNEL_INVAL_WAIT`], or after
    /// [`KERNEL_INVAL_STUCK`] as soon as `waiters()` (local requests wait for the glock
    /// being demoted: one of them may hold the directory or page lock the kernel's
    /// invalidation needs). Unconfirmed notifications stay queued; the next call for
    /// `ino` waits for them too, and `confirmed` is called once none is left (the
    /// glock machine lends the glock to the waiters meanwhile and starts the demote
    /// over: docs/internals/glocks.md).
    pub(super) fn kernel_invalidate(
        &self,
        names: Vec<(u64, Box<[u8]>)>,
        ino: u64,
        waiters: &dyn Fn() -> bool,
        confirmed: Box<dyn FnOnce() + Send>,
    ) -> bool {
        let Some(n) = self.notify.get() else {
            if let Some(k) = self.kernel.get() {
                for (d, name) in names {
                    k.inval_entry(d, &name);
                }
                k.inval_inode(ino);
            }
            return true;
        };
        self.outstanding.add(ino);
        if n.send(Notice { entries: names, inode: Some(ino), track: Some(ino), range: None }, None).is_err() {
            self.outstanding.done(ino);
        }
        let give_up = |waited: Duration| waited >= KERNEL_INVAL_WAIT || (waited >= KERNEL_INVAL_STUCK && waiters());
        if self.outstanding.wait(ino, &give_up) {
            return true;
        }
        self.outstanding.watch(ino, confirmed);
        false
    }

    /// Writes back and drops the kernel's cached pages of `ino` that hold bytes
    /// `start..=end`, then runs `done`: what the unlock of a file lock does first
    /// (docs/internals/file-locks.md, "Data under a lock"). A store through a shared
    /// mapping stays in this node's page cache until written back; written back under
    /// the inode's glock, it reaches the next lock holder on any node (whose pages that
    /// glock's demote dropped). Through the fuse-notify threads: the write-back comes
    /// to this mount as FUSE writes, so it must not run on a FUSE request thread.
    pub fn kernel_write_back(&self, ino: u64, start: u64, end: u64, done: Delivered) {
        if let Some(n) = self.notify.get() {
            let notice = Notice { range: Some((ino, start, end)), ..Default::default() };
            // A queue without threads: nothing will write back; go on.
            if let Err((_, Some(done))) = n.send(notice, Some(done)) {
                done();
            }
            return;
        }
        if let Some(k) = self.kernel.get() {
            k.write_back_range(ino, start, end);
        }
        done();
    }

    /// Cluster mounts: the epoch of directory `dir` (how many times its glock left
    /// this node), read before an operation that lets the kernel cache names in it,
    /// for [`note_entries`](Self::note_entries) after.
    pub fn entry_epoch(&self, dir: u64) -> u64 {
        if !self.is_cluster() {
            return 0;
        }
        self.kernel_names.lock().epoch.get(&dir).copied().unwrap_or(0)
    }

    /// Cluster mounts: the kernel is about to be given `names` in `dir` (positive or
    /// negative entries it keeps for the entry TTL). They are noted, to be invalidated
    /// when the directory's glock next leaves this node, and true is returned. False,
    /// noting nothing, when the glock left since `epoch` (the reply's content may be
    /// stale already) or another node asked for it (a demote is due, pending, or lent
    /// to local requests: docs/internals/glocks.md), or the directory is contended
    /// (its glock left this node within [`CONTENDED_FOR`]): the caller then gives the
    /// names with a zero entry timeout, so that the kernel asks again at their next use
    /// and no invalidation is needed. A demote that lends its glock to local requests
    /// thus gets no new names to invalidate from them, and the demotes of a directory
    /// that moves between nodes have none at all: an `inval_entry` that waits for the
    /// directory lock a local request holds (a late invalidation) cannot leave a stale
    /// name in the kernel when there is no name to invalidate.
    pub fn note_entries<'a>(&self, dir: u64, epoch: u64, names: impl IntoIterator<Item = &'a [u8]>) -> bool {
        if !self.is_cluster() {
            return true;
        }
        if self.locks.demote_requested(crate::lock::LockName::Inode(dir)) {
            return false;
        }
        let mut k = self.kernel_names.lock();
        if k.epoch.get(&dir).copied().unwrap_or(0) != epoch || k.contended(dir) {
            return false;
        }
        let set = k.names.entry(dir).or_default();
        for n in names {
            if !set.contains(n) {
                set.insert(n.into());
            }
        }
        true
    }

    /// Cluster mounts: a rename gave the kernel `name` in `dir` (it moves its own
    /// entry, whose timeout no reply sets). Noted as [`note_entries`](Self::note_entries)
    /// does; when that is refused, the kernel is told to forget the name at once,
    /// after the reply (the kernel's invalidation waits for the directory lock that
    /// the request holds), and the directory's next demote waits for that too.
    pub fn note_renamed(&self, dir: u64, epoch: u64, name: &[u8]) {
        if self.note_entries(dir, epoch, [name]) {
            return;
        }
        match self.notify.get() {
            Some(q) => {
                let entries = vec![(dir, name.into())];
                self.outstanding.add(dir);
                if q.send(Notice { entries, track: Some(dir), ..Default::default() }, None).is_err() {
                    self.outstanding.done(dir);
                }
            }
            None => {
                if let Some(k) = self.kernel.get() {
                    k.inval_entry(dir, name);
                }
            }
        }
    }
}
