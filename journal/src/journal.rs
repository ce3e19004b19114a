//! The running journal of a mounted node: batches, group commit, checkpoint.
//!
//! State lives under one mutex; disk I/O happens with the mutex released, by
//! exactly one committing thread at a time (the `committing` slot). Threads
//! that need a batch durable while another thread commits wait on the condvar
//! and then commit whatever is still needed, so concurrent fsyncs share flushes.
//!
//! Space rule (see docs/internals/journal.md, "Space"): a batch is at most half
//! the ring (`max_batch_blocks`). After every commit at least that much of the
//! ring is free behind the on-disk tail; when a commit would leave less, it
//! checkpoints (writes the AIL home) before writing its commit header, and the
//! header carries the advanced tail. So the next batch always fits, and no log
//! block that the on-disk tail still covers is ever overwritten.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::block::{Commit, FLAG_CLEAN, FLAG_ONE_FLUSH, FLAG_UNMOUNT};
use crate::device::{Block, BlockDevice, DeviceError};
use crate::layout::{batch_log_blocks, commit_block, layout_body, write_home, write_ring};
use crate::log::{JournalError, LogRegion, Transaction};
use crate::replay::open_state;

/// Counters of a [`Journal`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Highest durable batch sequence number.
    pub committed_seq: u64,
    /// Batches written (commit headers written).
    pub batches: u64,
    /// Device flushes issued.
    pub flushes: u64,
    /// Metadata block copies written to the log.
    pub blocks_logged: u64,
    /// Revoke entries written to the log.
    pub revokes_logged: u64,
    /// Checkpoints (AIL written home).
    pub checkpoints: u64,
    /// Blocks written home by checkpoints.
    pub blocks_checkpointed: u64,
    /// Log blocks not covered by the on-disk tail..head.
    pub free_blocks: u64,
    /// Committed blocks not yet written home (AIL size).
    pub ail_blocks: u64,
    /// Write-backs of a part of the AIL ([`Journal::write_back`]) that wrote anything.
    pub write_backs: u64,
    /// Blocks written home (and revoked) by those write-backs.
    pub blocks_written_back: u64,
}

/// The batch being filled (open) or written (committing).
#[derive(Debug)]
struct Batch {
    seq: u64,
    blocks: BTreeMap<u64, Arc<Block>>,
    revokes: BTreeSet<u64>,
    /// Some transaction carries ordered data: flush before the header.
    ordered: bool,
}

impl Batch {
    fn new(seq: u64) -> Batch {
        Batch { seq, blocks: BTreeMap::new(), revokes: BTreeSet::new(), ordered: false }
    }
    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.revokes.is_empty()
    }
    fn log_blocks(&self) -> u64 {
        batch_log_blocks(self.blocks.len(), self.revokes.len())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Withdrawn,
    Full,
    ShutDown,
}

#[derive(Debug)]
struct State {
    open: Batch,
    committing: Option<Arc<Batch>>,
    committed_seq: u64,
    /// Committed copies not yet written home: addr -> (seq, block).
    ail: BTreeMap<u64, (u64, Arc<Block>)>,
    /// Copies a [`Journal::write_back`] is writing home, revoked by the batch being
    /// committed: until that batch is durable they are read from here, not from the
    /// device (whose copy may not be written yet).
    writing_home: BTreeMap<u64, Arc<Block>>,
    /// Start position of every committed transaction from the on-disk tail to the head.
    window: BTreeMap<u64, u64>,
    head_pos: u64,
    head_seq: u64,
    head_crc: u32,
    tail_pos: u64,
    tail_seq: u64,
    stopped: Option<Stop>,
    closing: bool,
    stats: JournalStats,
    /// Ordered data writes still in flight, per batch seq ([`Journal::add_ordered`]).
    inflight: BTreeMap<u64, usize>,
    /// A background committer runs ([`Journal::commit_in_background`]).
    background: bool,
    /// A batch the background committer is asked to commit.
    kick: Option<u64>,
}

/// An ordered data write in flight for a transaction already added: the batch
/// holding the transaction is not written until every such guard is dropped.
/// Call [`OrderedWrite::failed`] if the data write failed: the journal then
/// withdraws rather than commit metadata pointing at unwritten blocks.
#[derive(Debug)]
#[must_use = "dropping the guard says the data is written"]
pub struct OrderedWrite {
    journal: Arc<Journal>,
    seq: u64,
}

impl OrderedWrite {
    /// The data write failed: withdraw the journal, then release the batch.
    pub fn failed(self) {
        let mut g = self.journal.state.lock();
        tracing::error!(jid = self.journal.jid, seq = self.seq, "ordered data write failed; withdrawing");
        g.stopped = Some(Stop::Withdrawn);
        drop(g);
        // Drop releases the count and wakes the waiters, who now see Withdrawn.
    }
}

impl Drop for OrderedWrite {
    fn drop(&mut self) {
        let mut g = self.journal.state.lock();
        if let Some(n) = g.inflight.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                g.inflight.remove(&self.seq);
            }
        }
        self.journal.cond.notify_all();
    }
}

/// The journal of one jid, opened by the node that owns it.
///
/// `Send + Sync`; every method takes `&self`. Typical use: the file system
/// writes ordered data in place, [`Journal::add`]s a transaction, and on fsync
/// calls [`Journal::commit`] with the returned sequence number.
#[derive(Debug)]
pub struct Journal {
    dev: Arc<dyn BlockDevice>,
    region: LogRegion,
    nonce: u64,
    jid: u32,
    state: Mutex<State>,
    cond: Condvar,
    /// The background committer ([`Journal::commit_in_background`]).
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Journal {
    /// Opens a clean journal; `Err(Dirty)` if it needs replay. Writes nothing.
    pub fn open(dev: Arc<dyn BlockDevice>, region: LogRegion, nonce: u64, jid: u32) -> Result<Journal, JournalError> {
        let st = open_state(&*dev, region, nonce)?;
        if !st.clean {
            return Err(JournalError::Dirty { jid });
        }
        let free = region.blocks - 1;
        let state = State {
            open: Batch::new(st.head_seq + 1),
            committing: None,
            committed_seq: st.head_seq,
            ail: BTreeMap::new(),
            writing_home: BTreeMap::new(),
            window: BTreeMap::from([(st.head_seq, st.head_pos)]),
            head_pos: st.head_pos,
            head_seq: st.head_seq,
            head_crc: st.head_crc,
            tail_pos: st.head_pos,
            tail_seq: st.head_seq,
            stopped: None,
            closing: false,
            stats: JournalStats { committed_seq: st.head_seq, free_blocks: free, ..JournalStats::default() },
            inflight: BTreeMap::new(),
            background: false,
            kick: None,
        };
        tracing::info!(jid, head_seq = st.head_seq, head_pos = st.head_pos, "journal opened");
        Ok(Journal {
            dev,
            region,
            nonce,
            jid,
            state: Mutex::new(state),
            cond: Condvar::new(),
            committer: Mutex::new(None),
        })
    }

    /// The largest transaction, in log blocks (copies + descriptors + revoke
    /// blocks + 1), that [`Journal::add`] accepts: half the log.
    pub fn max_transaction_blocks(&self) -> u64 {
        self.region.max_batch_blocks()
    }

    /// Merges `tx` into the open batch and returns the batch's sequence
    /// number (the seq its commit header will carry).
    ///
    /// Normally no I/O. A later copy of an address replaces an earlier one in
    /// the batch; a revoke drops the batch's copy of that address; a copy
    /// after a revoke in the same batch cancels the revoke. I/O happens here
    /// in two cases: the batch would grow past half the log with `tx`
    /// (the open batch is committed first, after the commit in progress if
    /// any), or it has grown past a quarter of the log (it is committed before
    /// returning; with a background committer running, that thread is asked
    /// to commit it instead and `add` returns at once). Errors of that I/O stop the
    /// journal and are reported by the next [`Journal::commit`]. A transaction
    /// larger than [`Journal::max_transaction_blocks`] is not merged and stops
    /// the journal with [`JournalError::Full`].
    pub fn add(&self, tx: Transaction) -> u64 {
        self.add_inner(tx, true)
    }

    fn add_inner(&self, tx: Transaction, auto_commit: bool) -> u64 {
        let mut g = self.state.lock();
        let max = self.region.max_batch_blocks();
        let unique: BTreeSet<u64> = tx.blocks.iter().map(|(a, _)| *a).collect();
        let unique_revokes: BTreeSet<u64> = tx.revokes.iter().copied().collect();
        // Bounded: each round either returns or commits the open batch (after
        // which the merged size is the tx's own, checked first).
        for _ in 0..3 {
            if g.stopped.is_some() || g.closing {
                return g.open.seq;
            }
            if batch_log_blocks(unique.len(), unique_revokes.len()) > max {
                tracing::error!(jid = self.jid, blocks = unique.len(), max, "transaction larger than the log can hold");
                g.stopped = Some(Stop::Full);
                self.cond.notify_all();
                return g.open.seq;
            }
            let bound =
                batch_log_blocks(g.open.blocks.len() + unique.len(), g.open.revokes.len() + unique_revokes.len());
            if bound <= max || g.open.is_empty() {
                break;
            }
            let seq = g.open.seq;
            let _ = self.commit_locked(&mut g, seq);
        }
        if g.stopped.is_some() {
            return g.open.seq;
        }
        let open = &mut g.open;
        open.ordered |= tx.ordered;
        for r in tx.revokes {
            open.blocks.remove(&r);
            open.revokes.insert(r);
        }
        for (a, b) in tx.blocks {
            open.revokes.remove(&a);
            open.blocks.insert(a, b);
        }
        let seq = open.seq;
        if auto_commit && open.log_blocks() > self.region.blocks / 4 {
            if g.background {
                if g.kick.is_none_or(|k| k < seq) {
                    g.kick = Some(seq);
                    self.cond.notify_all();
                }
            } else {
                let _ = self.commit_locked(&mut g, seq);
            }
        }
        seq
    }

    /// Starts a thread that commits a batch grown past a quarter of the log, so
    /// that [`Journal::add`] does not do it: the adding thread (which may hold the
    /// file system's locks, stalling every other operation) returns at once, and
    /// later adds fill the next batch while this one is written, as jbd2's commit
    /// thread does. Only a batch that would outgrow half the log still makes
    /// `add` wait. The thread ends at [`Journal::stop_background`], or once the
    /// journal is shut down, stopped or dropped; it holds the journal only while
    /// it commits.
    pub fn commit_in_background(self: &Arc<Journal>) -> std::io::Result<()> {
        let mut handle = self.committer.lock();
        if handle.is_some() {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        self.state.lock().background = true;
        let spawned = std::thread::Builder::new().name(format!("jcommit-{}", self.jid)).spawn(move || loop {
            let Some(j) = weak.upgrade() else { return };
            let mut g = j.state.lock();
            if !g.background || g.stopped.is_some() || g.closing {
                return;
            }
            match g.kick.take() {
                // Errors stop the journal; the next commit reports them.
                Some(seq) => drop(j.commit_locked(&mut g, seq)),
                // Bounded wait: the thread must not keep a dropped journal alive.
                None => drop(j.cond.wait_for(&mut g, std::time::Duration::from_millis(200))),
            }
        });
        match spawned {
            Ok(h) => {
                *handle = Some(h);
                Ok(())
            }
            Err(e) => {
                self.state.lock().background = false;
                Err(e)
            }
        }
    }

    /// Stops the background committer and waits for it (it finishes the commit it
    /// is writing, if any); later adds commit in the adding thread again. A mount
    /// that goes away calls this, so that no thread of it writes to the device
    /// afterwards.
    pub fn stop_background(&self) {
        let handle = self.committer.lock().take();
        {
            let mut g = self.state.lock();
            g.background = false;
            g.kick = None;
            self.cond.notify_all();
        }
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// [`Journal::add`] for a transaction whose data is written in place *after*
    /// this call (outside the caller's locks): the returned guard keeps the batch
    /// from being written until it is dropped (data written) or failed. The
    /// batch is never committed from inside this call.
    pub fn add_ordered(self: &Arc<Journal>, mut tx: Transaction) -> (u64, OrderedWrite) {
        tx.ordered = true;
        let seq = self.add_inner(tx, false);
        let mut g = self.state.lock();
        // add_inner returned with the batch still open (no auto-commit after the
        // merge), and this thread holds no lock the committers wait for, so the
        // batch is still `seq` unless the journal stopped.
        *g.inflight.entry(seq).or_insert(0) += 1;
        drop(g);
        (seq, OrderedWrite { journal: self.clone(), seq })
    }

    /// Returns once batch `seq` and every batch before it are durable.
    /// `u64::MAX` means everything added so far. Cheap when there is nothing
    /// to do. Concurrent callers share one commit (group commit): a caller
    /// arriving while another thread commits waits for it, then commits the
    /// batch it still needs (which by then holds everyone else's adds too).
    ///
    /// An empty open batch counts as committed without using up its seq, so
    /// an `add` after `commit(seq)` of an empty batch may return `seq` again;
    /// commit that seq again before relying on it.
    ///
    /// Errors: the device error that withdrew the journal (once), then
    /// [`JournalError::Withdrawn`]; [`JournalError::Full`];
    /// [`JournalError::ShutDown`].
    pub fn commit(&self, seq: u64) -> Result<(), JournalError> {
        let mut g = self.state.lock();
        let target = if seq == u64::MAX {
            if g.open.is_empty() {
                g.open.seq - 1
            } else {
                g.open.seq
            }
        } else {
            seq.min(g.open.seq)
        };
        self.commit_locked(&mut g, target)
    }

    /// If the journal holds a copy of `addr` not yet written in place (in the
    /// open batch, the batch being committed, or committed but not
    /// checkpointed), copies the newest one into `buf` and returns true.
    /// Returns false for an address revoked since its last copy.
    pub fn read_block(&self, addr: u64, buf: &mut Block) -> bool {
        let g = self.state.lock();
        let found = |b: &Arc<Block>, buf: &mut Block| {
            buf.copy_from_slice(&b[..]);
            true
        };
        if let Some(b) = g.open.blocks.get(&addr) {
            return found(b, buf);
        }
        if g.open.revokes.contains(&addr) {
            return false;
        }
        if let Some(b) = g.writing_home.get(&addr) {
            return found(b, buf);
        }
        if let Some(c) = &g.committing {
            if let Some(b) = c.blocks.get(&addr) {
                return found(b, buf);
            }
            if c.revokes.contains(&addr) {
                return false;
            }
        }
        match g.ail.get(&addr) {
            Some((_, b)) => found(b, buf),
            None => false,
        }
    }

    /// Commits everything added so far, writes every committed block home,
    /// flushes, and writes a commit header carrying the advanced tail.
    /// Afterwards the log holds nothing that is not also in place.
    pub fn checkpoint(&self) -> Result<(), JournalError> {
        let mut g = self.state.lock();
        self.checkpoint_locked(&mut g, false)
    }

    /// A checkpoint of part of the log, for a lock that leaves this node (GFS2's
    /// `ail_empty_gl`): commits everything added so far, then writes home every
    /// committed block that `owned(addr, block)` picks and logs a revoke for each in
    /// the same batch, so that a later replay of this journal never writes the old
    /// copy over what another node writes there next. The body and the home writes
    /// are flushed before the commit header; when this returns the revokes are
    /// durable. The tail then only waits for the blocks not picked.
    ///
    /// A block with a newer copy added meanwhile (by a caller that does not hold the
    /// lock being given up) is left alone: the copy supersedes the old one. Returns the
    /// number of blocks written home. When no block `owned` picks is in the log at all
    /// (not added, not committed, not yet home) it does nothing, not even the commit,
    /// and returns 0. When the picked blocks'
    /// revokes would not fit in one batch, checkpoints whole instead.
    pub fn write_back(&self, owned: &dyn Fn(u64, &Block) -> bool) -> Result<usize, JournalError> {
        let mut g = self.state.lock();
        self.check_stopped(&g)?;
        // Nothing of the lock's anywhere in the log (it was held and nothing changed
        // under it, or all of it went home already): no commit, no flush.
        let held = |blocks: &BTreeMap<u64, Arc<Block>>| blocks.iter().any(|(a, b)| owned(*a, b));
        if !held(&g.open.blocks)
            && !g.committing.as_ref().is_some_and(|c| held(&c.blocks))
            && !g.ail.iter().any(|(a, (_, b))| owned(*a, b))
        {
            return Ok(0);
        }
        let target = if g.open.is_empty() { g.open.seq - 1 } else { g.open.seq };
        self.commit_locked(&mut g, target)?;
        self.wait_idle(&mut g)?;
        let picked: Vec<(u64, Arc<Block>)> = g
            .ail
            .iter()
            .filter(|(a, (_, b))| !g.open.blocks.contains_key(a) && !g.open.revokes.contains(a) && owned(**a, b))
            .map(|(a, (_, b))| (*a, b.clone()))
            .collect();
        if picked.is_empty() {
            return Ok(0);
        }
        let n = picked.len();
        let fits = batch_log_blocks(g.open.blocks.len(), g.open.revokes.len() + n) <= self.region.max_batch_blocks();
        if !fits {
            self.checkpoint_locked(&mut g, false)?;
            return Ok(n);
        }
        for (a, b) in picked {
            g.open.revokes.insert(a);
            g.writing_home.insert(a, b);
        }
        let r = self.write_batch(&mut g, false, false);
        g.writing_home.clear();
        r?;
        g.stats.write_backs += 1;
        g.stats.blocks_written_back += n as u64;
        Ok(n)
    }

    /// Clean unmount: commit, checkpoint, and a clean commit header. The
    /// journal is clean on disk afterwards and refuses further work
    /// ([`JournalError::ShutDown`]).
    pub fn shutdown(&self) -> Result<(), JournalError> {
        let mut g = self.state.lock();
        self.check_stopped(&g)?;
        g.closing = true;
        let r = self.checkpoint_locked(&mut g, true);
        if r.is_ok() {
            g.stopped = Some(Stop::ShutDown);
            tracing::info!(jid = self.jid, head_seq = g.head_seq, "journal shut down cleanly");
        }
        self.cond.notify_all();
        r
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        let g = self.state.lock();
        let mut s = g.stats;
        s.committed_seq = g.committed_seq;
        s.free_blocks = self.region.blocks - self.region.span(g.tail_pos, g.head_pos);
        s.ail_blocks = g.ail.len() as u64;
        s
    }

    fn check_stopped(&self, g: &State) -> Result<(), JournalError> {
        match g.stopped {
            None => Ok(()),
            Some(Stop::Withdrawn) => Err(JournalError::Withdrawn),
            Some(Stop::Full) => Err(JournalError::Full),
            Some(Stop::ShutDown) => Err(JournalError::ShutDown),
        }
    }

    /// Waits until no other thread is committing.
    fn wait_idle(&self, g: &mut MutexGuard<'_, State>) -> Result<(), JournalError> {
        loop {
            self.check_stopped(g)?;
            if g.committing.is_none() {
                return Ok(());
            }
            self.cond.wait(g);
        }
    }

    fn commit_locked(&self, g: &mut MutexGuard<'_, State>, target: u64) -> Result<(), JournalError> {
        loop {
            self.check_stopped(g)?;
            if g.committed_seq >= target {
                return Ok(());
            }
            if g.committing.is_some() {
                self.cond.wait(g);
                continue;
            }
            // Idle and target not durable: target is the open batch.
            if g.open.is_empty() {
                return Ok(());
            }
            self.write_batch(g, false, false)?;
        }
    }

    fn checkpoint_locked(&self, g: &mut MutexGuard<'_, State>, unmount: bool) -> Result<(), JournalError> {
        self.check_stopped(g)?;
        let target = if g.open.is_empty() { g.open.seq - 1 } else { g.open.seq };
        self.commit_locked(g, target)?;
        self.wait_idle(g)?;
        if !unmount && g.ail.is_empty() && g.tail_seq == g.head_seq {
            return Ok(());
        }
        // An empty batch (unless others added meanwhile) with a forced
        // checkpoint; for unmount, repeat until the header is clean. Bounded:
        // while closing, add merges nothing, so the second round is empty.
        for _ in 0..2 {
            let clean = self.write_batch(g, true, unmount)?;
            if clean || !unmount {
                return Ok(());
            }
            self.wait_idle(g)?;
        }
        Ok(())
    }

    /// Seals the open batch and writes it; the caller made sure no one else
    /// is committing. Returns whether the header written is clean.
    fn write_batch(
        &self,
        g: &mut MutexGuard<'_, State>,
        force_checkpoint: bool,
        unmount: bool,
    ) -> Result<bool, JournalError> {
        debug_assert!(g.committing.is_none());
        let region = self.region;
        let next = Batch::new(g.open.seq + 1);
        let batch = Arc::new(std::mem::replace(&mut g.open, next));
        g.committing = Some(batch.clone());
        let seq = batch.seq;
        // Ordered data of this batch still being written: wait for it (the batch
        // is sealed, so the count only goes down).
        while g.inflight.get(&seq).is_some_and(|n| *n > 0) && g.stopped.is_none() {
            self.cond.wait(g);
        }
        if g.stopped.is_some() {
            g.committing = None;
            self.cond.notify_all();
            self.check_stopped(g)?;
        }
        debug_assert_eq!(seq, g.head_seq + 1);
        let b = batch.log_blocks();
        let start = region.advance(g.head_pos, 1);
        let header_pos = region.advance(start, b - 1);
        let free = region.blocks - region.span(g.tail_pos, g.head_pos);
        // Invariant of the space rule (module docs): add() bounds batches to
        // max_batch_blocks and every commit leaves that much free.
        assert!(b <= free, "batch of {b} blocks but only {free} free: space invariant broken");

        // The tail this header could carry without a checkpoint: the oldest
        // transaction still holding an AIL block after this batch.
        let survivors = g.ail.iter().filter(|(a, _)| !batch.blocks.contains_key(a) && !batch.revokes.contains(a));
        let oldest = survivors.map(|(_, (s, _))| *s).min();
        let oldest = match (oldest, batch.blocks.is_empty()) {
            (Some(s), _) => Some(s),
            (None, false) => Some(seq),
            (None, true) => None,
        };
        let lazy_tail = match oldest {
            Some(s) if s < seq => (g.window[&s], s),
            _ => (start, seq),
        };
        let need_cp =
            force_checkpoint || region.blocks - region.span(lazy_tail.0, header_pos) < region.max_batch_blocks();
        let (tail_pos, tail_seq) = if need_cp { (start, seq) } else { lazy_tail };
        let mut home: Vec<(u64, Arc<Block>)> = if need_cp {
            g.ail
                .iter()
                .filter(|(a, _)| !batch.blocks.contains_key(a) && !batch.revokes.contains(a))
                .map(|(a, (_, blk))| (*a, blk.clone()))
                .collect()
        } else {
            Vec::new()
        };
        // A write-back's blocks, revoked by this batch: home before its header.
        home.extend(g.writing_home.iter().map(|(a, blk)| (*a, blk.clone())));
        let written_back = !g.writing_home.is_empty();
        let g_written_back = g.writing_home.len();
        let clean = batch.is_empty() && tail_seq == seq;
        // One flush is enough when nothing must be durable before the header:
        // no ordered data, no checkpointed blocks (the tail moves past them),
        // and not a clean header. Replay checks the body against the header and
        // falls back to the previous header if the body did not make it.
        let one_flush = !batch.ordered && !need_cp && !written_back && !clean && !unmount && !batch.is_empty();
        let flags = if clean { FLAG_CLEAN } else { 0 }
            | if unmount { FLAG_UNMOUNT } else { 0 }
            | if one_flush { FLAG_ONE_FLUSH } else { 0 };
        let prev_hash = g.head_crc;

        let result = MutexGuard::unlocked(g, || -> Result<u32, DeviceError> {
            let body = layout_body(region, self.nonce, seq, start, &batch.blocks, &batch.revokes);
            write_ring(&*self.dev, region, start, &body.bytes)?;
            write_home(&*self.dev, home.iter().map(|(a, blk)| (*a, &**blk)))?;
            // Flush 1: body, checkpointed blocks and earlier ordered data durable.
            if !one_flush {
                self.dev.flush()?;
            }
            let commit = Commit {
                flags,
                prev_hash,
                tail_pos,
                tail_seq,
                body_hash: body.hash,
                body_blocks: body.blocks as u32,
                region_start: region.start,
                region_blocks: region.blocks,
            };
            let (hdr, crc) = commit_block(region, self.nonce, seq, header_pos, commit);
            self.dev.write_at(region.addr(header_pos) * crate::device::BLOCK_SIZE as u64, &hdr[..])?;
            // Flush 2: the commit header is durable; so is the batch.
            self.dev.flush()?;
            Ok(crc)
        });
        g.committing = None;
        self.cond.notify_all();
        let crc = match result {
            Ok(crc) => crc,
            Err(e) => {
                tracing::error!(jid = self.jid, seq, error = %e, "journal write failed; withdrawing");
                g.stopped = Some(Stop::Withdrawn);
                return Err(e.into());
            }
        };
        let st = &mut **g;
        st.head_pos = header_pos;
        st.head_seq = seq;
        st.head_crc = crc;
        st.tail_pos = tail_pos;
        st.tail_seq = tail_seq;
        st.committed_seq = seq;
        if need_cp {
            st.ail.clear();
            st.stats.checkpoints += 1;
            st.stats.blocks_checkpointed += (home.len() - g_written_back) as u64;
        }
        for r in &batch.revokes {
            st.ail.remove(r);
        }
        for (a, blk) in &batch.blocks {
            st.ail.insert(*a, (seq, blk.clone()));
        }
        st.window.insert(seq, start);
        st.window.retain(|s, _| *s >= tail_seq);
        st.stats.batches += 1;
        st.stats.flushes += if one_flush { 1 } else { 2 };
        st.stats.blocks_logged += batch.blocks.len() as u64;
        st.stats.revokes_logged += batch.revokes.len() as u64;
        tracing::debug!(jid = self.jid, seq, blocks = b, checkpoint = need_cp, tail_seq, "batch committed");
        Ok(clean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{read_block, BLOCK_SIZE};
    use crate::{format, scan, CrashDevice, MemDevice};

    const NONCE: u64 = 42;
    const REGION: LogRegion = LogRegion { start: 4, blocks: 256 };
    const DEV_BLOCKS: u64 = 1024;

    fn blk(tag: u8) -> Arc<Block> {
        Arc::new([tag; BLOCK_SIZE])
    }

    fn tx(blocks: &[(u64, u8)], revokes: &[u64]) -> Transaction {
        let mut t = Transaction::new();
        for (a, v) in blocks {
            t.add_block(*a, blk(*v));
        }
        for r in revokes {
            t.revoke(*r);
        }
        t
    }

    fn setup() -> (Arc<MemDevice>, Journal) {
        let dev = Arc::new(MemDevice::new(DEV_BLOCKS * BLOCK_SIZE as u64));
        format(&*dev, REGION, NONCE).unwrap();
        let j = Journal::open(dev.clone(), REGION, NONCE, 3).unwrap();
        (dev, j)
    }

    fn home(dev: &dyn BlockDevice, addr: u64) -> u8 {
        let mut b = [0u8; BLOCK_SIZE];
        read_block(dev, addr, &mut b).unwrap();
        b[0]
    }

    #[test]
    fn commit_makes_a_batch_replayable_and_shutdown_cleans() {
        let (dev, j) = setup();
        let s = j.add(tx(&[(500, 1), (501, 1)], &[]));
        j.commit(s).unwrap();
        assert_eq!(home(&*dev, 500), 0, "not checkpointed yet");
        let mut b = [0u8; BLOCK_SIZE];
        assert!(j.read_block(500, &mut b));
        assert_eq!(b[0], 1);
        assert!(!j.read_block(502, &mut b));
        let plan = scan(&*dev, REGION, NONCE).unwrap();
        assert!(!plan.clean);
        assert_eq!(plan.writes.len(), 2);
        assert!(matches!(Journal::open(dev.clone(), REGION, NONCE, 3), Err(JournalError::Dirty { jid: 3 })));
        j.shutdown().unwrap();
        assert_eq!(home(&*dev, 500), 1);
        assert!(scan(&*dev, REGION, NONCE).unwrap().clean);
        assert!(matches!(j.commit(u64::MAX), Err(JournalError::ShutDown)));
        let after = j.add(tx(&[(500, 2)], &[]));
        assert!(after > s);
        assert!(!j.read_block(500, &mut b), "ignored after shutdown");
        Journal::open(dev, REGION, NONCE, 3).unwrap();
    }

    #[test]
    fn batch_merging_rules() {
        let (dev, j) = setup();
        let s1 = j.add(tx(&[(500, 1), (501, 1), (502, 1)], &[]));
        // A later copy replaces an earlier one.
        let s2 = j.add(tx(&[(500, 2)], &[]));
        // A revoke drops the batch's copy.
        j.add(tx(&[], &[501]));
        // A copy after a revoke in the same batch cancels the revoke.
        j.add(tx(&[], &[502]));
        j.add(tx(&[(502, 3)], &[]));
        assert_eq!(s1, s2);
        let mut b = [0u8; BLOCK_SIZE];
        assert!(j.read_block(500, &mut b) && b[0] == 2);
        assert!(!j.read_block(501, &mut b));
        assert!(j.read_block(502, &mut b) && b[0] == 3);
        j.commit(s1).unwrap();
        let plan = scan(&*dev, REGION, NONCE).unwrap();
        let w: Vec<(u64, u8)> = plan.writes.iter().map(|(a, b)| (*a, b[0])).collect();
        assert_eq!(w, vec![(500, 2), (502, 3)]);
        assert_eq!(plan.revokes, 1);
        assert_eq!(j.stats().batches, 1);
    }

    #[test]
    fn commit_with_nothing_open_is_free() {
        let (_dev, j) = setup();
        j.commit(u64::MAX).unwrap();
        let s = j.add(Transaction::new());
        j.commit(s).unwrap();
        assert_eq!(j.stats().flushes, 0);
        let s = j.add(tx(&[(600, 1)], &[]));
        j.commit(s).unwrap();
        j.commit(s).unwrap();
        j.commit(u64::MAX).unwrap();
        // No ordered data: body and header share one flush.
        assert_eq!(j.stats().flushes, 1);
        assert_eq!(j.stats().committed_seq, s);
        let mut t = tx(&[(601, 1)], &[]);
        t.ordered = true;
        let s = j.add(t);
        j.commit(s).unwrap();
        assert_eq!(j.stats().flushes, 3, "ordered data costs a flush before the header");
    }

    #[test]
    fn ordered_write_in_flight_holds_its_batch_back() {
        let (dev, j) = setup();
        let j = Arc::new(j);
        let (seq, guard) = j.add_ordered(tx(&[(600, 9)], &[]));
        let j2 = j.clone();
        let committer = std::thread::spawn(move || j2.commit(seq));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(j.stats().committed_seq, seq - 1, "the batch must wait for its data");
        // The data lands, then the guard goes: the commit proceeds.
        crate::device::write_block(&*dev, 900, &[1u8; BLOCK_SIZE]).unwrap();
        drop(guard);
        committer.join().unwrap().unwrap();
        assert_eq!(j.stats().committed_seq, seq);
        let (seq, guard) = j.add_ordered(tx(&[(601, 9)], &[]));
        guard.failed();
        assert!(matches!(j.commit(seq), Err(JournalError::Withdrawn)));
    }

    #[test]
    fn one_flush_header_without_its_body_is_ignored_and_superseded() {
        let crash = CrashDevice::new(DEV_BLOCKS * BLOCK_SIZE as u64, 7);
        format(&crash, REGION, NONCE).unwrap();
        let j = Journal::open(Arc::new(crash.clone()), REGION, NONCE, 0).unwrap();
        let s = j.add(tx(&[(500, 1)], &[]));
        j.commit(s).unwrap();
        // The next batch's body goes astray (as if lost in a crash before the
        // flush) while its header lands.
        let s = j.add(tx(&[(501, 2), (502, 2)], &[]));
        crash.misdirect_next_write((REGION.start + 150) * BLOCK_SIZE as u64);
        j.commit(s).unwrap();
        let plan = scan(&crash, REGION, NONCE).unwrap();
        assert_eq!(plan.head_seq, s - 1, "falls back to the header before");
        assert!(!plan.clean, "a newer clean header must supersede the skipped one");
        assert_eq!(plan.next_seq, s + 1);
        assert_eq!(plan.writes.iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![500]);
        crate::apply(&crash, REGION, NONCE, &plan).unwrap();
        let again = scan(&crash, REGION, NONCE).unwrap();
        assert!(again.clean && again.head_seq == s + 1, "{again:?}");
        assert_eq!(home(&crash, 500), 1);
        assert_eq!(home(&crash, 501), 0);
    }

    /// A device whose writes wait while the gate is closed.
    #[derive(Debug)]
    struct Gated {
        dev: MemDevice,
        open: Mutex<bool>,
        cond: Condvar,
        waiting: std::sync::atomic::AtomicUsize,
    }

    impl BlockDevice for Gated {
        fn len(&self) -> u64 {
            self.dev.len()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
            self.dev.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
            let mut open = self.open.lock();
            self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while !*open {
                self.cond.wait(&mut open);
            }
            self.waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            self.dev.write_at(offset, buf)
        }
        fn flush(&self) -> Result<(), DeviceError> {
            self.dev.flush()
        }
    }

    /// With the background committer, an add that passes a quarter of the log
    /// returns while the device has not written the batch yet; the next adds go
    /// to the next batch; the batch becomes durable once the device writes.
    #[test]
    fn big_batches_commit_in_the_background_without_holding_up_add() {
        let mem = MemDevice::new(DEV_BLOCKS * BLOCK_SIZE as u64);
        format(&mem, REGION, NONCE).unwrap();
        let dev = Arc::new(Gated { dev: mem, open: Mutex::new(false), cond: Condvar::new(), waiting: 0.into() });
        let j = Arc::new(Journal::open(dev.clone(), REGION, NONCE, 3).unwrap());
        j.commit_in_background().unwrap();
        let blocks: Vec<(u64, u8)> = (0..70).map(|i| (500 + i, 1)).collect();
        // Add in a thread: an add that committed inline would wait on the closed
        // gate, and the test would report that instead of hanging.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let j2 = j.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(j2.add(tx(&blocks, &[])));
        });
        let s = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("add waited for the device: the big batch was committed inline");
        // The committer writes batch `s` and waits at the gate; meanwhile adds go
        // to the next batch, without waiting either.
        while dev.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let s2 = j.add(tx(&[(900, 2)], &[]));
        assert_eq!(s2, s + 1, "the add after the big one goes to the next batch");
        assert!(j.stats().committed_seq < s);
        *dev.open.lock() = true;
        dev.cond.notify_all();
        j.commit(s).unwrap();
        assert!(j.stats().committed_seq >= s);
        assert_eq!(j.stats().batches, 1, "batch {s} alone is written; {s2} stays open");
        // Stopped, the committer is gone and adds commit inline again.
        j.stop_background();
        let more: Vec<(u64, u8)> = (0..70).map(|i| (600 + i, 3)).collect();
        let s3 = j.add(tx(&more, &[]));
        assert_eq!(j.stats().committed_seq, s3);
    }

    #[test]
    fn big_batches_commit_by_themselves() {
        let (dev, j) = setup();
        // More than a quarter of 256 blocks: committed inside add.
        let blocks: Vec<(u64, u8)> = (0..70).map(|i| (500 + i, 1)).collect();
        let s = j.add(tx(&blocks, &[]));
        assert_eq!(j.stats().committed_seq, s);
        assert!(!scan(&*dev, REGION, NONCE).unwrap().clean);
        // Two transactions that together pass half the log go in two batches.
        let a: Vec<(u64, u8)> = (0..60).map(|i| (600 + i, 2)).collect();
        let b: Vec<(u64, u8)> = (0..100).map(|i| (700 + i, 3)).collect();
        let sa = j.add(tx(&a, &[]));
        assert_eq!(j.stats().committed_seq, s, "a quarter or less stays open");
        let sb = j.add(tx(&b, &[]));
        assert_eq!(sb, sa + 1);
        assert_eq!(j.stats().committed_seq, sb);
        // Space ran short on the way, so part of it was checkpointed already;
        // after replay all of it is in place.
        assert!(j.stats().checkpoints > 0);
        let plan = scan(&*dev, REGION, NONCE).unwrap();
        crate::apply(&*dev, REGION, NONCE, &plan).unwrap();
        for (a, v) in blocks.iter().chain(&a).chain(&b) {
            assert_eq!(home(&*dev, *a), *v);
        }
    }

    #[test]
    fn oversized_transaction_is_full() {
        let (_dev, j) = setup();
        let blocks: Vec<(u64, u8)> = (0..j.max_transaction_blocks()).map(|i| (500 + i, 1)).collect();
        let s = j.add(tx(&blocks, &[]));
        assert!(matches!(j.commit(s), Err(JournalError::Full)));
        assert!(matches!(j.checkpoint(), Err(JournalError::Full)));
    }

    #[test]
    fn device_error_withdraws() {
        let crash = CrashDevice::new(DEV_BLOCKS * BLOCK_SIZE as u64, 1);
        format(&crash, REGION, NONCE).unwrap();
        let j = Journal::open(Arc::new(crash.clone()), REGION, NONCE, 0).unwrap();
        let s = j.add(tx(&[(500, 1)], &[]));
        crash.fail_after(2); // body write ok, first flush fails
        assert!(matches!(j.commit(s), Err(JournalError::Device(DeviceError::Injected))));
        crash.restart();
        assert!(matches!(j.commit(s), Err(JournalError::Withdrawn)));
        assert!(matches!(j.checkpoint(), Err(JournalError::Withdrawn)));
        assert!(matches!(j.shutdown(), Err(JournalError::Withdrawn)));
    }

    #[test]
    fn ring_laps_many_times_with_automatic_checkpoints() {
        let (dev, j) = setup();
        let mut last = [0u8; 40];
        for i in 0..400u32 {
            let n = 1 + (i % 7) as u64;
            let blocks: Vec<(u64, u8)> =
                (0..n).map(|k| (500 + (u64::from(i) * 3 + k) % 40, (i % 251) as u8 + 1)).collect();
            for (a, v) in &blocks {
                last[(*a - 500) as usize] = *v;
            }
            let s = j.add(tx(&blocks, &[]));
            j.commit(s).unwrap();
            let st = j.stats();
            assert!(st.free_blocks >= j.max_transaction_blocks(), "space rule broken at {i}: {st:?}");
        }
        let st = j.stats();
        assert!(st.checkpoints > 0, "{st:?}");
        assert!(st.batches == 400);
        // Crash now: replay gives the newest content of every block.
        let plan = scan(&*dev, REGION, NONCE).unwrap();
        crate::apply(&*dev, REGION, NONCE, &plan).unwrap();
        for (k, v) in last.iter().enumerate() {
            assert_eq!(home(&*dev, 500 + k as u64), *v, "block {}", 500 + k);
        }
    }

    #[test]
    fn misdirected_body_is_detected_not_replayed() {
        let crash = CrashDevice::new(DEV_BLOCKS * BLOCK_SIZE as u64, 1);
        format(&crash, REGION, NONCE).unwrap();
        let j = Journal::open(Arc::new(crash.clone()), REGION, NONCE, 0).unwrap();
        // Ordered data: two flushes, so a bad body under a durable header is damage.
        let mut t = tx(&[(500, 1)], &[]);
        t.ordered = true;
        let s = j.add(t);
        // The body (descriptor + copy) lands 100 blocks further into the ring.
        crash.misdirect_next_write((REGION.start + 101) * BLOCK_SIZE as u64);
        j.commit(s).unwrap();
        match scan(&crash, REGION, NONCE) {
            Err(JournalError::Corrupt { block, .. }) => assert_eq!(block, REGION.start + 1),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// What another node writes to a block after this node gave up its lock: a replay
    /// of this node's journal must leave it alone.
    fn scribble(dev: &dyn BlockDevice, addr: u64, v: u8) {
        crate::device::write_block(dev, addr, &[v; BLOCK_SIZE]).unwrap();
    }

    fn replayed(dev: &dyn BlockDevice) -> Vec<(u64, u8)> {
        let plan = scan(dev, REGION, NONCE).unwrap();
        plan.writes.iter().map(|(a, b)| (*a, b[0])).collect()
    }

    #[test]
    fn write_back_writes_home_and_revokes_only_the_blocks_picked() {
        let (dev, j) = setup();
        j.add(tx(&[(500, 1), (501, 1), (600, 1)], &[]));
        j.commit(u64::MAX).unwrap();
        // Not yet committed either: write_back commits first.
        j.add(tx(&[(502, 2)], &[]));
        let n = j.write_back(&|a, _| (500..600).contains(&a)).unwrap();
        assert_eq!(n, 3, "500, 501 and 502");
        for a in [500, 501] {
            assert_eq!(home(&*dev, a), 1, "{a} written home");
        }
        assert_eq!(home(&*dev, 502), 2);
        assert_eq!(home(&*dev, 600), 0, "600 was not picked: still only in the log");
        let st = j.stats();
        assert_eq!((st.ail_blocks, st.write_backs, st.blocks_written_back), (1, 1, 3));
        assert_eq!(st.checkpoints, 0);
        // The lock went; another node writes 500 and 502. A replay of this journal
        // (this node dies now) keeps their writes and still brings 600 home.
        scribble(&*dev, 500, 7);
        scribble(&*dev, 502, 7);
        assert_eq!(replayed(&*dev), vec![(600, 1)]);
        // The copies are still readable through the journal until evicted from it.
        let mut b = [0u8; BLOCK_SIZE];
        assert!(!j.read_block(500, &mut b), "500 is home: read from the device");
        assert!(j.read_block(600, &mut b) && b[0] == 1);
        // The lock comes back and 500 changes again: the new copy replays.
        j.add(tx(&[(500, 3)], &[]));
        j.commit(u64::MAX).unwrap();
        assert_eq!(replayed(&*dev), vec![(500, 3), (600, 1)]);
        let batches = j.stats().batches;
        j.add(tx(&[(601, 1)], &[]));
        assert_eq!(j.write_back(&|a, _| a == 999).unwrap(), 0, "nothing picked");
        let st = j.stats();
        assert_eq!((st.write_backs, st.batches), (1, batches), "nothing of 999 in the log: not even a commit");
        assert_eq!(j.write_back(&|a, _| a == 601).unwrap(), 1, "601 is committed first, then written back");
    }

    #[test]
    fn write_back_commits_newer_copies_first_and_waits_for_a_batch_in_flight() {
        let (dev, j) = setup();
        j.add(tx(&[(500, 1), (501, 1)], &[]));
        j.commit(u64::MAX).unwrap();
        let j = Arc::new(j);
        // A batch of another thread is being written with its ordered data in flight
        // when the write-back comes, and a newer copy of 501 sits in the open batch:
        // the write-back waits for the first, commits the second, and writes home the
        // newest copy of each block it picks.
        let (_, guard) = j.add_ordered(tx(&[(700, 1)], &[]));
        let j2 = j.clone();
        let committer = std::thread::spawn(move || j2.commit(u64::MAX));
        std::thread::sleep(std::time::Duration::from_millis(50));
        j.add(tx(&[(501, 2)], &[]));
        let j3 = j.clone();
        let wb = std::thread::spawn(move || j3.write_back(&|a, _| a == 500 || a == 501));
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(guard);
        committer.join().unwrap().unwrap();
        let n = wb.join().unwrap().unwrap();
        assert_eq!(home(&*dev, 500), 1);
        // The write-back committed 501's newer copy first, then wrote it home too.
        assert_eq!(home(&*dev, 501), 2, "{n} written back");
        scribble(&*dev, 500, 7);
        scribble(&*dev, 501, 7);
        assert_eq!(replayed(&*dev), vec![(700, 1)]);
    }

    #[test]
    fn blocks_written_back_let_the_tail_pass_without_a_checkpoint() {
        let (_dev, j) = setup();
        // Lap the ring several times, each batch's blocks written back at once:
        // the log never needs a whole checkpoint.
        for i in 0..200u64 {
            let a = 500 + (i % 40);
            j.add(tx(&[(a, i as u8), (a + 100, 1)], &[]));
            j.write_back(&|x, _| x < 600).unwrap();
            j.write_back(&|x, _| x >= 600).unwrap();
        }
        let st = j.stats();
        assert_eq!(st.checkpoints, 0, "{st:?}");
        assert_eq!(st.ail_blocks, 0);
        assert!(st.free_blocks > REGION.blocks / 2, "{st:?}");
    }

    #[test]
    fn checkpoint_writes_home_and_leaves_nothing_to_replay() {
        let (dev, j) = setup();
        j.add(tx(&[(500, 1), (501, 1)], &[]));
        j.commit(u64::MAX).unwrap();
        j.add(tx(&[(502, 2)], &[501]));
        j.checkpoint().unwrap();
        assert_eq!((home(&*dev, 500), home(&*dev, 501), home(&*dev, 502)), (1, 0, 2));
        assert_eq!(j.stats().ail_blocks, 0);
        let plan = scan(&*dev, REGION, NONCE).unwrap();
        assert!(plan.clean && plan.writes.is_empty());
        let before = j.stats().flushes;
        j.checkpoint().unwrap();
        assert_eq!(j.stats().flushes, before, "nothing to checkpoint");
    }

    #[test]
    fn concurrent_committers_all_become_durable() {
        let (dev, j) = setup();
        let j = Arc::new(j);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let s = j.add(tx(&[(500 + t * 64 + i, (i + 1) as u8)], &[]));
                        j.commit(s).unwrap();
                        let mut b = [0u8; BLOCK_SIZE];
                        assert!(
                            j.read_block(500 + t * 64 + i, &mut b) || home(&*j.dev, 500 + t * 64 + i) == (i + 1) as u8
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = j.stats();
        assert!(st.batches <= 200 && st.flushes <= st.batches + st.checkpoints, "{st:?}");
        let plan = scan(&*dev, REGION, NONCE).unwrap();
        crate::apply(&*dev, REGION, NONCE, &plan).unwrap();
        for t in 0..4u64 {
            for i in 0..50u64 {
                assert_eq!(home(&*dev, 500 + t * 64 + i), (i + 1) as u8);
            }
        }
    }
}
