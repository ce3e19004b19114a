//! File locks of a cluster mount: flock(2) and fcntl(2) locks ("plocks"), served by
//! lockd's plock service so that they hold across nodes (docs/internals/file-locks.md).
//!
//! * [`Plocks`]: what the lock layer offers: one plock operation, a cancel, and a
//!   place to run the waits. The cluster mount implements it over its lockspace
//!   handle ([`crate::cluster`]); a lock_nolock mount has none
//!   ([`crate::lock::LockModule::plocks`]), and the kernel keeps its locks itself.
//! * [`FileLocks`]: the FUSE adapter's bookkeeping above it: the waiting operations
//!   (for interrupts), and which owners may hold locks on an inode or through an open
//!   file, so that a close that has no locks to drop costs no lockd round trip.
//!
//! No call here blocks its caller: every answer comes through a `done` callback, run
//! on the runtime (or at once, when nothing needs asking). A lock wait never holds a
//! FUSE thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

pub use concord_lockd::plock::{PlockConflict, PlockOp, PlockResult, PlockSpace};

use crate::Result;

/// The answer of one plock operation, to be awaited on the runtime.
pub type PlockFuture = Pin<Box<dyn Future<Output = Result<PlockResult>> + Send + 'static>>;

/// A task for the runtime.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The cluster's file lock service, as the lock layer offers it.
pub trait Plocks: Send + Sync + std::fmt::Debug {
    /// Runs `op` on the locks of inode `ino` in `space`. `token` names the operation
    /// for [`cancel`](Self::cancel) and is unique among operations in flight. A waiting
    /// lock's future ends once it is granted, refused (deadlock) or cancelled. Fails
    /// when the node can no longer lock (fenced, withdrawn, lockd lost or failing).
    fn op(&self, token: u64, space: PlockSpace, ino: u64, op: PlockOp) -> PlockFuture;
    /// Cancels the waiting operation `token`; its own future then answers
    /// [`PlockResult::Cancelled`] (or `Granted` if the grant came first).
    fn cancel(&self, token: u64) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'static>>;
    /// Runs `task` on the runtime.
    fn spawn(&self, task: Task);
    /// This node's id, as [`PlockConflict::node`] names nodes.
    fn node(&self) -> u32;
}

/// What a set-lock request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// A set-lock request (FUSE SETLK / SETLKW).
#[derive(Clone, Copy, Debug)]
pub struct SetLock {
    /// The kernel's lock owner: the process's file table for a POSIX lock, the open
    /// file for an OFD or flock lock.
    pub owner: u64,
    /// The caller's pid (for F_GETLK on this node).
    pub pid: u32,
    /// First and last byte, inclusive (`i64::MAX` as the end: to the end of the file).
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
    /// Wait for a conflicting lock to go (F_SETLKW, flock without LOCK_NB).
    pub wait: bool,
    /// A flock(2) lock (FUSE_LK_FLOCK): whole file, its own space.
    pub flock: bool,
}

/// How many interrupts of requests not (yet) waiting are remembered.
const INTERRUPTED_KEPT: usize = 64;

#[derive(Debug, Default)]
struct State {
    /// Waiting lock requests by token, each with the way to tell its task to cancel.
    pending: HashMap<u64, oneshot::Sender<()>>,
    /// Interrupts that named no waiting request: the request may not have arrived
    /// yet (the kernel sends an interrupt as soon as the request was read). Oldest
    /// first, at most [`INTERRUPTED_KEPT`].
    interrupted: VecDeque<u64>,
    /// Per inode: the POSIX owners that set a lock on it since their last flush there.
    posix: HashMap<u64, HashSet<u64>>,
    /// Per open file (FUSE file handle): (inode, the POSIX owners that set a lock
    /// through it and were not flushed through it since). At release they are
    /// unlocked: OFD locks, whose owner is the open file, are never flushed.
    handles: HashMap<u64, (u64, HashSet<u64>)>,
}

/// Writes back (and drops) the kernel's pages of inode, bytes `start..=end`, then
/// runs the callback ([`crate::Filesystem::kernel_write_back`]).
pub type WriteBack = Arc<dyn Fn(u64, u64, u64, Box<dyn FnOnce() + Send>) + Send + Sync>;

/// How long an unlock waits for the kernel to write back the range's pages before it
/// goes on regardless (the pages still go out later; only the order is lost).
const WRITE_BACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The FUSE adapter's file lock bookkeeping over a [`Plocks`].
pub struct FileLocks {
    plocks: Arc<dyn Plocks>,
    state: Arc<Mutex<State>>,
    write_back: Option<WriteBack>,
}

impl std::fmt::Debug for FileLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLocks").field("plocks", &self.plocks).field("state", &self.state).finish_non_exhaustive()
    }
}

/// Called once with an operation's answer.
pub type Done<T> = Box<dyn FnOnce(Result<T>) + Send + 'static>;

impl FileLocks {
    pub fn new(plocks: Arc<dyn Plocks>) -> FileLocks {
        FileLocks { plocks, state: Arc::new(Mutex::new(State::default())), write_back: None }
    }

    /// Before an unlock (F_UNLCK, LOCK_UN) goes to the lock service, the kernel's
    /// pages of the unlocked range are written back and dropped through `wb`: stores
    /// through a shared mapping made under the lock then reach the next holder, on any
    /// node, as NFS flushes at unlock. After a lock is granted, the pages of its range
    /// go the same way before the caller hears of it, so that it reads through the
    /// filesystem what the last holder wrote, as NFS revalidates at lock. (A close
    /// needs no write-back: the kernel writes a file's dirty pages back before it
    /// sends FLUSH.)
    pub fn with_write_back(mut self, wb: WriteBack) -> FileLocks {
        self.write_back = Some(wb);
        self
    }

    /// This node's id (a conflict held here has a pid the kernel can translate).
    pub fn node(&self) -> u32 {
        self.plocks.node()
    }

    /// Sets or removes a lock on inode `ino` for `l.owner`, through open file `fh`;
    /// request `token`. A waiting lock is cancelled by [`interrupt`](Self::interrupt)
    /// of `token`, also one that came before this call.
    pub fn set(&self, token: u64, ino: u64, fh: u64, l: SetLock, done: Done<PlockResult>) {
        let space = if l.flock { PlockSpace::Flock } else { PlockSpace::Posix };
        let op = match l.kind {
            LockKind::Unlock if l.flock => PlockOp::UnlockOwner { owner: l.owner },
            LockKind::Unlock => PlockOp::Unlock { owner: l.owner, start: l.start, end: l.end },
            LockKind::Read | LockKind::Write => PlockOp::Lock {
                owner: l.owner,
                pid: l.pid,
                start: l.start,
                end: l.end,
                write: l.kind == LockKind::Write,
                wait: l.wait,
            },
        };
        let mut cancel = None;
        {
            let mut st = self.state.lock();
            if !l.flock && l.kind != LockKind::Unlock {
                st.posix.entry(ino).or_default().insert(l.owner);
                st.handles.entry(fh).or_insert_with(|| (ino, HashSet::new())).1.insert(l.owner);
            }
            if l.wait && l.kind != LockKind::Unlock {
                if let Some(i) = st.interrupted.iter().position(|t| *t == token) {
                    // Interrupted before it started: nothing was asked, nothing to undo.
                    st.interrupted.remove(i);
                    drop(st);
                    return done(Ok(PlockResult::Cancelled));
                }
                let (tx, rx) = oneshot::channel();
                st.pending.insert(token, tx);
                cancel = Some(rx);
            }
        }
        let range = if l.flock { (0, u64::MAX) } else { (l.start, l.end) };
        let wb = self.write_back.clone();
        let Some(cancel) = cancel else {
            let plocks = self.plocks.clone();
            return self.plocks.spawn(Box::pin(async move {
                if l.kind == LockKind::Unlock {
                    write_back(&wb, ino, range, "unlocked").await;
                }
                let r = plocks.op(token, space, ino, op).await;
                if l.kind != LockKind::Unlock && matches!(r, Ok(PlockResult::Granted)) {
                    write_back(&wb, ino, range, "locked").await;
                }
                done(r)
            }));
        };
        let fut = self.plocks.op(token, space, ino, op);
        let (plocks, state) = (self.plocks.clone(), self.state.clone());
        self.plocks.spawn(Box::pin(async move {
            let mut fut = fut;
            // Biased: the request is polled (written to lockd's socket) before a
            // cancel can be, so the cancel never overtakes the request it names.
            let r = tokio::select! {
                biased;
                r = &mut fut => r,
                Ok(()) = cancel => {
                    if let Err(e) = plocks.cancel(token).await {
                        tracing::warn!(token, error = %e, "cancelling a waiting file lock");
                    }
                    fut.await
                }
            };
            state.lock().pending.remove(&token);
            if matches!(r, Ok(PlockResult::Granted)) {
                write_back(&wb, ino, range, "locked").await;
            }
            done(r)
        }));
    }

    /// F_GETLK: the first lock of another owner that conflicts with a lock of
    /// `owner` on `start..=end`.
    pub fn get(&self, token: u64, ino: u64, owner: u64, start: u64, end: u64, write: bool, done: Done<PlockResult>) {
        let fut = self.plocks.op(token, PlockSpace::Posix, ino, PlockOp::Get { owner, start, end, write });
        self.plocks.spawn(Box::pin(async move { done(fut.await) }));
    }

    /// The kernel interrupted request `unique` (its caller got a signal): a waiting
    /// lock request is cancelled; any other is remembered a while, in case it is a
    /// lock request that has not arrived yet.
    pub fn interrupt(&self, unique: u64) {
        let mut st = self.state.lock();
        if let Some(tx) = st.pending.remove(&unique) {
            let _ = tx.send(());
            return;
        }
        if st.interrupted.len() == INTERRUPTED_KEPT {
            st.interrupted.pop_front();
        }
        st.interrupted.push_back(unique);
    }

    /// A close of a descriptor of open file `fh` on inode `ino` by `owner` (its
    /// process's file table): POSIX says every lock of that owner on the inode goes.
    /// Asks lockd only when the owner locked there since its last flush.
    pub fn flush(&self, token: u64, ino: u64, fh: u64, owner: u64, done: Done<()>) {
        let held = {
            let mut st = self.state.lock();
            if let Some((_, owners)) = st.handles.get_mut(&fh) {
                owners.remove(&owner);
            }
            remove_owner(&mut st.posix, ino, owner)
        };
        if !held {
            return done(Ok(()));
        }
        let fut = self.plocks.op(token, PlockSpace::Posix, ino, PlockOp::UnlockOwner { owner });
        self.plocks.spawn(Box::pin(async move { done(fut.await.map(|_| ())) }));
    }

    /// The last reference to open file `fh` on inode `ino` is gone: its flock lock
    /// (`flock_owner`, which the kernel names when the file ever took one) and the
    /// POSIX locks set through it by owners never flushed through it (OFD locks).
    pub fn release(&self, token: u64, ino: u64, fh: u64, flock_owner: Option<u64>, done: Done<()>) {
        let mut ops = Vec::new();
        {
            let mut st = self.state.lock();
            if let Some((fino, owners)) = st.handles.remove(&fh) {
                for owner in owners {
                    remove_owner(&mut st.posix, fino, owner);
                    ops.push((PlockSpace::Posix, fino, owner));
                }
            }
        }
        if let Some(owner) = flock_owner {
            ops.push((PlockSpace::Flock, ino, owner));
        }
        if ops.is_empty() {
            return done(Ok(()));
        }
        let plocks = self.plocks.clone();
        self.plocks.spawn(Box::pin(async move {
            let mut result = Ok(());
            // One after the other: they share the release's token.
            for (space, ino, owner) in ops {
                if let Err(e) = plocks.op(token, space, ino, PlockOp::UnlockOwner { owner }).await {
                    result = Err(e);
                }
            }
            done(result)
        }));
    }
}

/// Has the kernel write back and drop its pages of `ino` in `range` (through `wb`,
/// if there is one) and waits for it at most [`WRITE_BACK_WAIT`]. Before an unlock,
/// so that stores through a shared mapping reach the next holder; after a grant, so
/// that the holder reads through the filesystem (under the inode's glock) what the
/// last holder on any node wrote, not pages this node kept from before: NFS flushes
/// at unlock and revalidates at lock the same way.
async fn write_back(wb: &Option<WriteBack>, ino: u64, range: (u64, u64), what: &str) {
    let Some(wb) = wb else { return };
    let (tx, rx) = oneshot::channel();
    wb(
        ino,
        range.0,
        range.1,
        Box::new(move || {
            let _ = tx.send(());
        }),
    );
    if tokio::time::timeout(WRITE_BACK_WAIT, rx).await.is_err() {
        tracing::warn!(ino, "file lock: the kernel did not write the {what} range back in time");
    }
}

/// Removes `owner` from inode `ino`'s set; whether it was there.
fn remove_owner(posix: &mut HashMap<u64, HashSet<u64>>, ino: u64, owner: u64) -> bool {
    let Some(set) = posix.get_mut(&ino) else { return false };
    let was = set.remove(&owner);
    if set.is_empty() {
        posix.remove(&ino);
    }
    was
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every operation and answers from a script; waits answer when
    /// cancelled.
    #[derive(Debug, Default)]
    struct Fake {
        log: Mutex<Vec<String>>,
        cancelled: Arc<tokio::sync::Notify>,
    }

    impl Plocks for Fake {
        fn op(&self, token: u64, space: PlockSpace, ino: u64, op: PlockOp) -> PlockFuture {
            self.log.lock().push(format!("{token} {space:?} {ino} {op:?}"));
            let waits = matches!(op, PlockOp::Lock { wait: true, .. });
            let c = self.cancelled.clone();
            Box::pin(async move {
                if waits {
                    c.notified().await;
                    return Ok(PlockResult::Cancelled);
                }
                Ok(match op {
                    PlockOp::Lock { .. } => PlockResult::Granted,
                    PlockOp::Get { .. } => PlockResult::Free,
                    _ => PlockResult::Unlocked,
                })
            })
        }
        fn cancel(&self, token: u64) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'static>> {
            self.log.lock().push(format!("cancel {token}"));
            self.cancelled.notify_one();
            Box::pin(async { Ok(()) })
        }
        fn spawn(&self, task: Task) {
            tokio::runtime::Handle::current().spawn(task);
        }
        fn node(&self) -> u32 {
            1
        }
    }

    fn lock(owner: u64, wait: bool) -> SetLock {
        SetLock { owner, pid: 7, start: 0, end: 9, kind: LockKind::Write, wait, flock: false }
    }

    async fn answer<T: Send + 'static>(f: impl FnOnce(Done<T>)) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        f(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.expect("answered")
    }

    #[tokio::test]
    async fn a_close_without_locks_asks_nothing_and_one_with_locks_unlocks_the_owner() {
        let fake = Arc::new(Fake::default());
        let fl = FileLocks::new(fake.clone());
        answer(|d| fl.flush(1, 10, 100, 5, d)).await.unwrap();
        assert!(fake.log.lock().is_empty(), "a close without locks asks lockd nothing");
        assert_eq!(answer(|d| fl.set(2, 10, 100, lock(5, false), d)).await.unwrap(), PlockResult::Granted);
        answer(|d| fl.flush(3, 10, 100, 5, d)).await.unwrap();
        answer(|d| fl.flush(4, 10, 100, 5, d)).await.unwrap();
        answer(|d| fl.release(5, 10, 100, None, d)).await.unwrap();
        let log = fake.log.lock().clone();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[1], "3 Posix 10 UnlockOwner { owner: 5 }");
    }

    #[tokio::test]
    async fn release_unlocks_ofd_owners_and_the_flock_owner() {
        let fake = Arc::new(Fake::default());
        let fl = FileLocks::new(fake.clone());
        // An OFD lock: the owner is the open file, never flushed.
        answer(|d| fl.set(1, 10, 100, lock(77, false), d)).await.unwrap();
        answer(|d| fl.flush(2, 10, 100, 5, d)).await.unwrap();
        answer(|d| fl.release(3, 10, 100, Some(77), d)).await.unwrap();
        let log = fake.log.lock().clone();
        assert_eq!(log[1..], ["3 Posix 10 UnlockOwner { owner: 77 }", "3 Flock 10 UnlockOwner { owner: 77 }"]);
    }

    #[tokio::test]
    async fn an_unlock_writes_the_range_back_before_it_asks_and_a_grant_after() {
        let fake = Arc::new(Fake::default());
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (l2, f2) = (log.clone(), fake.clone());
        let fl = FileLocks::new(fake.clone()).with_write_back(Arc::new(move |ino, start, end, done| {
            // What the lock service saw when the write-back ran.
            l2.lock().push(format!("write back {ino} {start}..={end} after {} ops", f2.log.lock().len()));
            done()
        }));
        // A grant: the range's pages go after the lock service granted it.
        answer(|d| fl.set(1, 10, 100, lock(5, false), d)).await.unwrap();
        assert_eq!(*log.lock(), ["write back 10 0..=9 after 1 ops"]);
        // An unlock: before the lock service hears of it.
        let unlock = SetLock { kind: LockKind::Unlock, ..lock(5, false) };
        assert_eq!(answer(|d| fl.set(2, 10, 100, unlock, d)).await.unwrap(), PlockResult::Unlocked);
        let flock_un =
            SetLock { kind: LockKind::Unlock, flock: true, start: 0, end: i64::MAX as u64, ..lock(6, false) };
        answer(|d| fl.set(3, 10, 100, flock_un, d)).await.unwrap();
        // A get writes nothing back.
        answer(|d| fl.get(4, 10, 5, 0, 9, true, d)).await.unwrap();
        assert_eq!(
            *log.lock(),
            [
                "write back 10 0..=9 after 1 ops",
                "write back 10 0..=9 after 1 ops",
                &format!("write back 10 0..={} after 2 ops", u64::MAX)
            ],
            "the lock service log: {:?}",
            fake.log.lock()
        );
    }

    #[tokio::test]
    async fn an_interrupt_cancels_a_waiting_lock_also_one_that_came_first() {
        let fake = Arc::new(Fake::default());
        let fl = FileLocks::new(fake.clone());
        let (tx, rx) = oneshot::channel();
        fl.set(
            1,
            10,
            100,
            lock(5, true),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        tokio::task::yield_now().await;
        fl.interrupt(1);
        assert_eq!(rx.await.unwrap().unwrap(), PlockResult::Cancelled);
        assert!(fake.log.lock().contains(&"cancel 1".to_string()));
        // The interrupt first: the lock is not even asked for.
        fl.interrupt(2);
        assert_eq!(answer(|d| fl.set(2, 10, 100, lock(5, true), d)).await.unwrap(), PlockResult::Cancelled);
        assert_eq!(fake.log.lock().len(), 2, "{:?}", fake.log.lock());
        assert!(fl.state.lock().pending.is_empty());
    }
}
