//! mkfs, scan, replay and info for one log region.
//!
//! Replay is split as STYLE.md rule 8 asks: [`scan`] only reads and returns a
//! [`ReplayPlan`]; the decisions inside it are the pure functions
//! [`replay_decision`] and [`PlanBuilder`]; [`apply`] writes a plan and is
//! idempotent.

use std::collections::BTreeMap;

use crate::block::{raw_crc, BodyHasher, Commit, LogBlock, FLAG_CLEAN, FLAG_ONE_FLUSH};
use crate::device::{Block, BlockDevice, BLOCK_SIZE};
use crate::file_device::AlignedBuf;
use crate::layout::{as_block, commit_block, write_home};
use crate::log::{JournalError, LogRegion};

/// Blocks read per device request while scanning.
const SCAN_CHUNK_BLOCKS: u64 = 256;

/// What replaying a journal would do; produced by [`scan`], executed by [`apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayPlan {
    /// The head commit header says nothing needs replay.
    pub clean: bool,
    /// Sequence number of the head (newest valid) commit header.
    pub head_seq: u64,
    /// Ring position of the head commit header.
    pub head_pos: u64,
    /// Sequence number of the oldest transaction walked.
    pub tail_seq: u64,
    /// Transactions walked, tail to head inclusive.
    pub transactions: u64,
    /// Revoke entries found.
    pub revokes: u64,
    /// Blocks to write in place, sorted by address.
    pub writes: Vec<(u64, Box<Block>)>,
    /// Seq of the clean header [`apply`] writes: `head_seq + 1`, or above a
    /// newer one-flush header whose body did not reach the disk (skipped).
    pub next_seq: u64,
}

/// Summary of a journal for `concord jinfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalInfo {
    /// Nothing needs replay.
    pub clean: bool,
    /// Sequence number of the head commit header.
    pub head_seq: u64,
    /// Ring position of the head commit header.
    pub head_pos: u64,
    /// Sequence number of the tail transaction.
    pub tail_seq: u64,
    /// Log blocks from the tail to the head inclusive.
    pub used_blocks: u64,
}

/// What replay does with one home address, given the newest logged copy and
/// the newest revoke of it found between tail and head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing logged: leave the block alone.
    NotLogged,
    /// Write the newest copy in place.
    Write,
    /// A revoke in the same or a later transaction than the newest copy: the
    /// block was freed (and may hold new data now); do not write.
    Revoked,
}

/// The replay decision table (one row per arm; see docs/internals/journal.md).
pub fn replay_decision(newest_copy_seq: Option<u64>, newest_revoke_seq: Option<u64>) -> Decision {
    match (newest_copy_seq, newest_revoke_seq) {
        (None, _) => Decision::NotLogged,
        (Some(_), None) => Decision::Write,
        (Some(c), Some(r)) if r >= c => Decision::Revoked,
        (Some(_), Some(_)) => Decision::Write,
    }
}

/// Collects what the walk finds (pass 1) and decides what to write (pass 2).
/// Pure: no I/O.
#[derive(Debug, Default)]
pub struct PlanBuilder {
    /// home address -> (seq, ring position) of its newest copy.
    copies: BTreeMap<u64, (u64, u64)>,
    /// home address -> newest seq revoking it.
    revokes: BTreeMap<u64, u64>,
    revoke_entries: u64,
}

impl PlanBuilder {
    /// A copy of `home` in transaction `seq` at ring position `pos`.
    /// Transactions must be fed oldest first.
    pub fn copy(&mut self, seq: u64, home: u64, pos: u64) {
        self.copies.insert(home, (seq, pos));
    }

    /// A revoke of `home` in transaction `seq`.
    pub fn revoke(&mut self, seq: u64, home: u64) {
        self.revoke_entries += 1;
        let e = self.revokes.entry(home).or_insert(seq);
        *e = (*e).max(seq);
    }

    /// The blocks to write: (home address, ring position of the copy), sorted
    /// by home address.
    pub fn decide(&self) -> Vec<(u64, u64)> {
        self.copies
            .iter()
            .filter(|(home, (seq, _))| replay_decision(Some(*seq), self.revokes.get(home).copied()) == Decision::Write)
            .map(|(home, (_, pos))| (*home, *pos))
            .collect()
    }
}

/// Reads ring positions through a cache of one aligned chunk.
struct RingReader<'a> {
    dev: &'a dyn BlockDevice,
    region: LogRegion,
    buf: AlignedBuf,
    /// Ring position of the first cached block and number cached.
    cached: Option<(u64, u64)>,
}

impl<'a> RingReader<'a> {
    fn new(dev: &'a dyn BlockDevice, region: LogRegion) -> RingReader<'a> {
        let n = SCAN_CHUNK_BLOCKS.min(region.blocks) as usize;
        RingReader { dev, region, buf: AlignedBuf::new(n * BLOCK_SIZE), cached: None }
    }

    fn read(&mut self, pos: u64) -> Result<&Block, JournalError> {
        let hit = matches!(self.cached, Some((s, n)) if pos >= s && pos < s + n);
        if !hit {
            let n = SCAN_CHUNK_BLOCKS.min(self.region.blocks - pos);
            let bytes = n as usize * BLOCK_SIZE;
            self.dev.read_at(self.region.addr(pos) * BLOCK_SIZE as u64, &mut self.buf.as_mut_slice()[..bytes])?;
            self.cached = Some((pos, n));
        }
        let (s, _) = self.cached.expect("filled above");
        let at = (pos - s) as usize * BLOCK_SIZE;
        Ok(as_block(&self.buf.as_slice()[at..at + BLOCK_SIZE]))
    }
}

/// The newest valid commit header of the region.
struct Head {
    pos: u64,
    seq: u64,
    crc: u32,
    commit: Commit,
}

/// The valid commit header with the highest seq below `below`.
fn find_head(reader: &mut RingReader<'_>, nonce: u64, below: u64) -> Result<Option<Head>, JournalError> {
    let region = reader.region;
    let mut best: Option<Head> = None;
    for pos in 0..region.blocks {
        let b = reader.read(pos)?;
        if let Ok(LogBlock::Commit { hdr, commit }) = LogBlock::decode_at(b, nonce, region.addr(pos)) {
            let ours = commit.region_start == region.start && commit.region_blocks == region.blocks;
            if ours && hdr.seq < below && best.as_ref().is_none_or(|h| hdr.seq > h.seq) {
                let crc = raw_crc_field(b);
                best = Some(Head { pos, seq: hdr.seq, crc, commit });
            }
        }
    }
    Ok(best)
}

/// The crc field of an encoded log block (its hash for the prev_hash chain).
fn raw_crc_field(b: &Block) -> u32 {
    let at = crate::block::off::CRC;
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Result of the walk, before the copies are read.
struct Walk {
    head: Head,
    tail_pos: u64,
    transactions: u64,
    builder: PlanBuilder,
}

fn corrupt(region: LogRegion, pos: u64, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt { block: region.addr(pos), reason: reason.into() }
}

/// Finds the head and walks tail → head, verifying every transaction.
fn walk(reader: &mut RingReader<'_>, nonce: u64, below: u64) -> Result<Walk, JournalError> {
    let region = reader.region;
    let head = find_head(reader, nonce, below)?
        .ok_or_else(|| corrupt(region, 0, "no valid commit header for this nonce (not formatted?)"))?;
    let mut builder = PlanBuilder::default();
    let mut pos = head.commit.tail_pos;
    let mut seq = head.commit.tail_seq;
    let mut prev_hash: Option<u32> = None;
    let mut walked = 0u64;
    let mut transactions = 0u64;
    loop {
        // One transaction: descriptors with their copies, revokes, commit.
        let mut hasher = BodyHasher::default();
        let mut body = 0u64;
        let mut next_desc = 0u32;
        let mut next_revoke = 0u32;
        let commit_pos;
        let (commit, crc) = loop {
            walked += 1;
            if walked > region.blocks {
                return Err(corrupt(region, pos, "walk from the tail does not reach the head"));
            }
            let b = reader.read(pos)?;
            let decoded = LogBlock::decode_at(b, nonce, region.addr(pos))
                .map_err(|e| corrupt(region, pos, format!("expected a block of transaction {seq}: {e}")))?;
            if decoded.header().seq != seq {
                return Err(corrupt(region, pos, format!("seq {} where {seq} was expected", decoded.header().seq)));
            }
            match decoded {
                LogBlock::Descriptor { index, addrs, .. } => {
                    if index != next_desc || next_revoke > 0 {
                        return Err(corrupt(region, pos, "descriptor out of order"));
                    }
                    next_desc += 1;
                    hasher.push(raw_crc(b));
                    body += 1;
                    for home in addrs {
                        pos = region.advance(pos, 1);
                        walked += 1;
                        if walked > region.blocks {
                            return Err(corrupt(region, pos, "transaction longer than the ring"));
                        }
                        hasher.push(raw_crc(reader.read(pos)?));
                        body += 1;
                        builder.copy(seq, home, pos);
                    }
                }
                LogBlock::Revoke { index, addrs, .. } => {
                    if index != next_revoke {
                        return Err(corrupt(region, pos, "revoke block out of order"));
                    }
                    next_revoke += 1;
                    hasher.push(raw_crc(b));
                    body += 1;
                    for home in addrs {
                        builder.revoke(seq, home);
                    }
                }
                LogBlock::Commit { commit, .. } => {
                    commit_pos = pos;
                    break (commit, raw_crc_field(b));
                }
            }
            pos = region.advance(pos, 1);
        };
        if u64::from(commit.body_blocks) != body || commit.body_hash != hasher.finish() {
            return Err(corrupt(
                region,
                commit_pos,
                format!("body of transaction {seq} does not match its commit header"),
            ));
        }
        if prev_hash.is_some_and(|h| h != commit.prev_hash) {
            return Err(corrupt(region, commit_pos, format!("transaction {seq} breaks the commit chain")));
        }
        transactions += 1;
        if seq == head.seq {
            if commit_pos != head.pos {
                return Err(corrupt(region, commit_pos, "head transaction found at the wrong position"));
            }
            break;
        }
        prev_hash = Some(crc);
        seq += 1;
        pos = region.advance(commit_pos, 1);
    }
    Ok(Walk { tail_pos: head.commit.tail_pos, head, transactions, builder })
}

/// Reads the log and returns what replay must do. Writes nothing.
///
/// Finds the head (the valid commit header with this nonce and the highest
/// seq, reading the region in chunks of 256 blocks), walks its transactions
/// from its tail, verifying descriptors, body hashes and the commit chain,
/// collects revokes and copies, and decides per home address with
/// [`replay_decision`].
pub fn scan(dev: &dyn BlockDevice, region: LogRegion, nonce: u64) -> Result<ReplayPlan, JournalError> {
    Ok(scan_inner(dev, region, nonce)?.0)
}

fn scan_inner(dev: &dyn BlockDevice, region: LogRegion, nonce: u64) -> Result<(ReplayPlan, u64, u32), JournalError> {
    region.check(dev.len())?;
    let mut reader = RingReader::new(dev, region);
    let (w, skipped) = match walk(&mut reader, nonce, u64::MAX) {
        Ok(w) => (w, None),
        Err(e) => {
            // The newest header may be a one-flush commit whose body did not
            // reach the disk before a crash (never acknowledged): fall back to
            // the header before it. Any other damage stays an error.
            match find_head(&mut reader, nonce, u64::MAX)? {
                Some(h) if h.commit.flags & FLAG_ONE_FLUSH != 0 => match walk(&mut reader, nonce, h.seq) {
                    Ok(w) => {
                        tracing::info!(region.start, seq = h.seq, "one-flush commit without its body: ignored");
                        (w, Some(h.seq))
                    }
                    Err(_) => return Err(e),
                },
                _ => return Err(e),
            }
        }
    };
    let mut todo = w.builder.decide();
    // Read the copies in ring order from the tail (sequential), then sort by address.
    let ring_order = |pos: u64| (pos + region.blocks - w.tail_pos) % region.blocks;
    todo.sort_by_key(|(_, pos)| ring_order(*pos));
    let mut writes = Vec::with_capacity(todo.len());
    for (home, pos) in todo {
        let mut b = crate::device::zeroed_block();
        b.copy_from_slice(reader.read(pos)?);
        writes.push((home, b));
    }
    writes.sort_by_key(|(home, _)| *home);
    // After a skipped header, replay must write a newer clean header even when
    // the fallback head is clean, so that the skipped one is never the head.
    let clean = w.head.commit.flags & FLAG_CLEAN != 0 && skipped.is_none();
    let plan = ReplayPlan {
        clean,
        head_seq: w.head.seq,
        head_pos: w.head.pos,
        tail_seq: w.head.commit.tail_seq,
        transactions: w.transactions,
        revokes: w.builder.revoke_entries,
        writes,
        next_seq: skipped.unwrap_or(w.head.seq) + 1,
    };
    if w.head.commit.flags & FLAG_CLEAN != 0 && !plan.writes.is_empty() {
        return Err(corrupt(region, w.head.pos, "clean header but blocks to replay"));
    }
    Ok((plan, w.tail_pos, w.head.crc))
}

/// Executes a plan: writes its blocks in place, flushes, then writes a clean
/// commit header after the head (seq head+1, tail = itself) and flushes.
/// Idempotent; a clean plan writes nothing.
pub fn apply(dev: &dyn BlockDevice, region: LogRegion, nonce: u64, plan: &ReplayPlan) -> Result<(), JournalError> {
    region.check(dev.len())?;
    if plan.clean {
        return Ok(());
    }
    // Re-read the head: its hash continues the chain, and a head that changed
    // since the scan means someone else touched this journal.
    let mut head = crate::device::zeroed_block();
    crate::device::read_block(dev, region.addr(plan.head_pos), &mut head)?;
    match LogBlock::decode_at(&head, nonce, region.addr(plan.head_pos)) {
        Ok(LogBlock::Commit { hdr, .. }) if hdr.seq == plan.head_seq => {}
        _ => return Err(corrupt(region, plan.head_pos, "head commit header changed since the scan")),
    }
    write_home(dev, plan.writes.iter().map(|(a, b)| (*a, &**b)))?;
    dev.flush()?;
    let pos = region.advance(plan.head_pos, 1);
    let seq = plan.next_seq;
    let (buf, _) = commit_block(region, nonce, seq, pos, clean_commit(region, pos, seq, raw_crc_field(&head)));
    crate::device::write_block(dev, region.addr(pos), &buf)?;
    dev.flush()?;
    tracing::info!(region.start, head_seq = plan.head_seq, writes = plan.writes.len(), "journal replayed");
    Ok(())
}

/// A commit header with an empty body whose tail is itself.
pub(crate) fn clean_commit(region: LogRegion, pos: u64, seq: u64, prev_hash: u32) -> Commit {
    Commit {
        flags: FLAG_CLEAN,
        prev_hash,
        tail_pos: pos,
        tail_seq: seq,
        body_hash: BodyHasher::default().finish(),
        body_blocks: 0,
        region_start: region.start,
        region_blocks: region.blocks,
    }
}

/// mkfs: makes the region an empty, clean journal by writing one clean commit
/// header at position 0 and flushing. The rest of the region need not be
/// zeroed. The header's seq is 1, or one above any commit header with the
/// same nonce already in the region (so a re-format with a reused nonce still
/// has the newest header).
pub fn format(dev: &dyn BlockDevice, region: LogRegion, nonce: u64) -> Result<(), JournalError> {
    region.check(dev.len())?;
    let mut reader = RingReader::new(dev, region);
    let mut max_seq = 0u64;
    for pos in 0..region.blocks {
        if let Ok(LogBlock::Commit { hdr, .. }) = LogBlock::decode_at(reader.read(pos)?, nonce, region.addr(pos)) {
            max_seq = max_seq.max(hdr.seq);
        }
    }
    let seq = max_seq + 1;
    let (buf, _) = commit_block(region, nonce, seq, 0, clean_commit(region, 0, seq, 0));
    crate::device::write_block(dev, region.start, &buf)?;
    dev.flush()?;
    Ok(())
}

/// Summary of the journal (a full scan, read-only).
pub fn info(dev: &dyn BlockDevice, region: LogRegion, nonce: u64) -> Result<JournalInfo, JournalError> {
    let (plan, tail_pos, _) = scan_inner(dev, region, nonce)?;
    Ok(JournalInfo {
        clean: plan.clean,
        head_seq: plan.head_seq,
        head_pos: plan.head_pos,
        tail_seq: plan.tail_seq,
        used_blocks: region.span(tail_pos, plan.head_pos),
    })
}

/// The head of a journal, for [`crate::Journal::open`].
pub(crate) struct OpenState {
    pub head_pos: u64,
    pub head_seq: u64,
    pub head_crc: u32,
    pub clean: bool,
}

pub(crate) fn open_state(dev: &dyn BlockDevice, region: LogRegion, nonce: u64) -> Result<OpenState, JournalError> {
    let (plan, _, head_crc) = scan_inner(dev, region, nonce)?;
    Ok(OpenState { head_pos: plan.head_pos, head_seq: plan.head_seq, head_crc, clean: plan.clean })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::LogBlock;
    use crate::device::{read_block, write_block, BLOCK_SIZE};
    use crate::layout::{layout_body, write_ring};
    use crate::MemDevice;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    const NONCE: u64 = 0xC0FFEE;
    const REGION: LogRegion = LogRegion { start: 10, blocks: 256 };

    #[test]
    fn decision_table_row_by_row() {
        // Row 1: nothing logged.
        assert_eq!(replay_decision(None, None), Decision::NotLogged);
        assert_eq!(replay_decision(None, Some(4)), Decision::NotLogged);
        // Row 2: logged, never revoked.
        assert_eq!(replay_decision(Some(4), None), Decision::Write);
        // Row 3: revoke then relog (copy newer than revoke).
        assert_eq!(replay_decision(Some(5), Some(4)), Decision::Write);
        // Row 4: revoke in the same transaction as the copy.
        assert_eq!(replay_decision(Some(5), Some(5)), Decision::Revoked);
        // Row 5: relog then revoke (revoke newer).
        assert_eq!(replay_decision(Some(5), Some(6)), Decision::Revoked);
    }

    #[test]
    fn plan_builder_keeps_newest_copy_and_newest_revoke() {
        let mut p = PlanBuilder::default();
        p.copy(1, 100, 3);
        p.copy(2, 100, 7);
        p.revoke(1, 100); // older than the newest copy: ignored
        p.copy(1, 200, 4);
        p.revoke(3, 200);
        p.revoke(2, 200);
        assert_eq!(p.decide(), vec![(100, 7)]);
    }

    /// Writes hand-made transactions into a log, as the journal would.
    struct TestLog {
        dev: MemDevice,
        next_pos: u64,
        next_seq: u64,
        prev_crc: u32,
        /// (start pos, seq) of each transaction written.
        txs: Vec<(u64, u64)>,
        /// Position of the last commit header.
        head: u64,
    }

    fn blk(tag: u8) -> Arc<Block> {
        Arc::new([tag; BLOCK_SIZE])
    }

    impl TestLog {
        fn new() -> TestLog {
            let dev = MemDevice::new(400 * BLOCK_SIZE as u64);
            format(&dev, REGION, NONCE).unwrap();
            let mut h = [0u8; BLOCK_SIZE];
            read_block(&dev, REGION.start, &mut h).unwrap();
            TestLog { dev, next_pos: 1, next_seq: 2, prev_crc: raw_crc_field(&h), txs: vec![(0, 1)], head: 0 }
        }

        /// Starts the next transaction at `pos` instead (to test wrap-around).
        fn jump(&mut self, pos: u64) {
            self.next_pos = pos;
        }

        /// Writes a transaction whose header's tail is transaction number
        /// `tail_idx` (index into `txs`); returns its start position.
        fn tx(&mut self, blocks: &[(u64, u8)], revokes: &[u64], tail_idx: usize) -> u64 {
            let blocks: BTreeMap<u64, Arc<Block>> = blocks.iter().map(|(a, t)| (*a, blk(*t))).collect();
            let revokes: BTreeSet<u64> = revokes.iter().copied().collect();
            let seq = self.next_seq;
            let start = self.next_pos;
            let body = layout_body(REGION, NONCE, seq, start, &blocks, &revokes);
            write_ring(&self.dev, REGION, start, &body.bytes).unwrap();
            let hpos = REGION.advance(start, body.blocks);
            // tail_idx == txs.len() means "this transaction itself".
            let (tail_pos, tail_seq) = self.txs.get(tail_idx).copied().unwrap_or((start, seq));
            let c = Commit {
                flags: 0,
                prev_hash: self.prev_crc,
                tail_pos,
                tail_seq,
                body_hash: body.hash,
                body_blocks: body.blocks as u32,
                region_start: REGION.start,
                region_blocks: REGION.blocks,
            };
            let (h, crc) = commit_block(REGION, NONCE, seq, hpos, c);
            write_block(&self.dev, REGION.addr(hpos), &h).unwrap();
            self.txs.push((start, seq));
            self.prev_crc = crc;
            self.next_seq += 1;
            self.next_pos = REGION.advance(hpos, 1);
            self.head = hpos;
            start
        }

        fn plan(&self) -> ReplayPlan {
            scan(&self.dev, REGION, NONCE).unwrap()
        }
    }

    fn written(plan: &ReplayPlan) -> Vec<(u64, u8)> {
        plan.writes.iter().map(|(a, b)| (*a, b[0])).collect()
    }

    #[test]
    fn fresh_format_is_clean_and_empty() {
        let log = TestLog::new();
        let p = log.plan();
        assert!(p.clean);
        assert_eq!((p.head_seq, p.head_pos, p.tail_seq, p.transactions), (1, 0, 1, 1));
        assert!(p.writes.is_empty());
        let i = info(&log.dev, REGION, NONCE).unwrap();
        assert_eq!(i.used_blocks, 1);
    }

    #[test]
    fn newest_copy_wins() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1), (301, 1)], &[], 0);
        log.tx(&[(300, 2)], &[], 0);
        let p = log.plan();
        assert!(!p.clean);
        assert_eq!((p.head_seq, p.tail_seq, p.transactions), (3, 1, 3));
        assert_eq!(written(&p), vec![(300, 2), (301, 1)]);
    }

    #[test]
    fn revoke_then_relog_is_written() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        log.tx(&[], &[300], 0);
        log.tx(&[(300, 3)], &[], 0);
        assert_eq!(written(&log.plan()), vec![(300, 3)]);
    }

    #[test]
    fn relog_then_revoke_is_skipped() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        log.tx(&[(300, 2), (301, 2)], &[], 0);
        log.tx(&[], &[300], 0);
        let p = log.plan();
        assert_eq!(written(&p), vec![(301, 2)]);
        assert_eq!(p.revokes, 1);
    }

    #[test]
    fn revoke_in_same_transaction_as_copy_is_skipped() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1), (301, 1)], &[300], 0);
        assert_eq!(written(&log.plan()), vec![(301, 1)]);
    }

    #[test]
    fn wraps_around_the_ring_end() {
        let mut log = TestLog::new();
        // Move the log near the end of the ring with a transaction that itself
        // wraps: descriptor at 254, copies at 255, 0, 1, ...
        log.tx(&[(300, 1)], &[], 0);
        log.jump(REGION.blocks - 2);
        // The tail must be a transaction still intact: make the first one at
        // the jump the tail of everything after it.
        let before = log.txs.len();
        log.tx(&[(301, 2), (302, 2), (303, 2)], &[300], 1);
        // txs[before] is that transaction; overwrite nothing of it.
        log.tx(&[(304, 3)], &[], before);
        let p = log.plan();
        assert!(p.head_pos < 10, "head wrapped to the start: {}", p.head_pos);
        assert_eq!(written(&p), vec![(301, 2), (302, 2), (303, 2), (304, 3)]);
        assert_eq!(p.transactions, 2);
    }

    #[test]
    fn stale_blocks_from_an_older_lap_are_ignored() {
        let mut log = TestLog::new();
        // First lap: transactions all over the ring.
        for i in 0..40u8 {
            log.tx(&[(300 + u64::from(i % 5), i)], &[], log.txs.len() - 1);
        }
        let first_lap = log.plan();
        // Second lap from position 1 (as after a checkpoint wrapped), tail = itself.
        log.jump(1);
        let idx = log.txs.len();
        log.tx(&[(310, 99)], &[], idx);
        let p = log.plan();
        assert_eq!(written(&p), vec![(310, 99)]);
        assert_eq!(p.head_seq, first_lap.head_seq + 1);
        assert_eq!(p.transactions, 1);
    }

    #[test]
    fn foreign_nonce_is_ignored() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        // Another file system's journal in the same place, with higher seqs.
        let other = 0xBAD;
        let b = LogBlock::Commit {
            hdr: crate::block::Header { nonce: other, seq: 1000, addr: REGION.addr(5) },
            commit: clean_commit(REGION, 5, 1000, 0),
        };
        write_block(&log.dev, REGION.addr(5), &b.to_block().0).unwrap();
        let p = log.plan();
        assert_eq!(p.head_seq, 2);
        assert_eq!(written(&p), vec![(300, 1)]);
        // And that journal's own scan sees only its header.
        let q = scan(&log.dev, REGION, other).unwrap();
        assert!(q.clean && q.head_seq == 1000);
    }

    #[test]
    fn misdirected_commit_header_is_ignored() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        // A valid header copied to the wrong place does not count.
        let mut h = [0u8; BLOCK_SIZE];
        read_block(&log.dev, REGION.addr(log.head), &mut h).unwrap();
        write_block(&log.dev, REGION.addr(100), &h).unwrap();
        assert_eq!(log.plan().head_pos, log.head);
    }

    #[test]
    fn torn_commit_header_means_transaction_not_committed() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        log.tx(&[(300, 2), (301, 2)], &[], 0);
        let mut h = [0u8; BLOCK_SIZE];
        read_block(&log.dev, REGION.addr(log.head), &mut h).unwrap();
        // The header's fields all sit in sector 0: a tear either keeps the old
        // sector 0 (here zeros) or keeps the whole header.
        let mut torn = h;
        torn[..512].fill(0);
        write_block(&log.dev, REGION.addr(log.head), &torn).unwrap();
        let p = log.plan();
        assert_eq!(p.head_seq, 2);
        assert_eq!(written(&p), vec![(300, 1)]);
        // A damaged header field fails the crc the same way.
        let mut bad = h;
        bad[60] ^= 1;
        write_block(&log.dev, REGION.addr(log.head), &bad).unwrap();
        assert_eq!(log.plan().head_seq, 2);
    }

    #[test]
    fn missing_body_block_with_invalid_header_ignores_transaction() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        let start = log.tx(&[(301, 2)], &[], 0);
        // Lose a body block (descriptor) and the header.
        write_block(&log.dev, REGION.addr(start), &[0u8; BLOCK_SIZE]).unwrap();
        write_block(&log.dev, REGION.addr(log.head), &[0u8; BLOCK_SIZE]).unwrap();
        assert_eq!(written(&log.plan()), vec![(300, 1)]);
    }

    #[test]
    fn missing_body_block_under_valid_header_is_corruption() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        let start = log.tx(&[(301, 2)], &[], 0);
        // Copy changed: the body hash catches it.
        write_block(&log.dev, REGION.addr(start + 1), &[9u8; BLOCK_SIZE]).unwrap();
        assert!(matches!(scan(&log.dev, REGION, NONCE), Err(JournalError::Corrupt { .. })));
    }

    #[test]
    fn broken_chain_is_corruption() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        log.prev_crc ^= 1;
        log.tx(&[(301, 2)], &[], 0);
        assert!(matches!(scan(&log.dev, REGION, NONCE), Err(JournalError::Corrupt { .. })));
    }

    #[test]
    fn unformatted_region_is_corruption() {
        let dev = MemDevice::new(400 * BLOCK_SIZE as u64);
        assert!(matches!(scan(&dev, REGION, NONCE), Err(JournalError::Corrupt { .. })));
        let small = LogRegion { start: 0, blocks: 255 };
        assert!(matches!(scan(&dev, small, NONCE), Err(JournalError::TooSmall { .. })));
        let outside = LogRegion { start: 200, blocks: 256 };
        assert!(matches!(format(&dev, outside, NONCE), Err(JournalError::OutsideDevice { .. })));
    }

    #[test]
    fn apply_is_idempotent_and_leaves_clean() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1), (302, 1)], &[], 0);
        log.tx(&[(301, 2)], &[302], 0);
        let p = log.plan();
        apply(&log.dev, REGION, NONCE, &p).unwrap();
        let img = log.dev.snapshot();
        assert_eq!(img[300 * BLOCK_SIZE], 1);
        assert_eq!(img[301 * BLOCK_SIZE], 2);
        assert_eq!(img[302 * BLOCK_SIZE], 0, "revoked block not written");
        let q = log.plan();
        assert!(q.clean);
        assert_eq!(q.head_seq, p.head_seq + 1);
        apply(&log.dev, REGION, NONCE, &q).unwrap();
        assert_eq!(log.dev.snapshot(), img, "applying a clean plan writes nothing");
        // Applying the old plan again (as if the first apply had crashed just
        // before its final flush and the scan had been repeated) changes nothing.
        apply(&log.dev, REGION, NONCE, &p).unwrap();
        assert_eq!(log.dev.snapshot(), img);
    }

    #[test]
    fn reformat_with_same_nonce_gets_a_newer_seq() {
        let mut log = TestLog::new();
        log.tx(&[(300, 1)], &[], 0);
        log.tx(&[(300, 2)], &[], 0);
        format(&log.dev, REGION, NONCE).unwrap();
        let p = log.plan();
        assert!(p.clean);
        assert_eq!(p.head_seq, 4);
        assert_eq!(p.head_pos, 0);
    }
}
