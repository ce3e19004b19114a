//! File data: read, write, fallocate, seek, truncate and punch. The block mapping and
//! allocation happen in a transaction under the filesystem mutex; the device reads and
//! writes of the data itself happen after it, under the inode lock only (in-flight
//! ranges make overlapping readers, writers and truncates wait: [`DataRange`]). Also
//! Concord's data cache ([`crate::cache::DataCache`]) fill and drops.

use std::sync::Arc;

use concord_journal::BlockDevice;

use crate::cache::DataCache;
use crate::core::Tx;
use crate::format::*;
use crate::lock::LockMode;
use crate::{bmap, FsError, Result};

use super::{now, Filesystem};

/// A registered in-flight data range; dropping it wakes the waiters.
struct DataRange<'a> {
    fs: &'a Filesystem,
    ino: u64,
    range: (u64, u64),
}

impl Drop for DataRange<'_> {
    fn drop(&mut self) {
        let mut m = self.fs.inflight.lock();
        if let Some(v) = m.get_mut(&self.ino) {
            if let Some(i) = v.iter().position(|r| *r == self.range) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                m.remove(&self.ino);
            }
        }
        self.fs.inflight_cv.notify_all();
    }
}

impl Filesystem {
    /// Waits until no data write to `[from, to)` of `ino` is in flight.
    pub(super) fn wait_data(&self, ino: u64, from: u64, to: u64) {
        let mut m = self.inflight.lock();
        while m.get(&ino).is_some_and(|v| v.iter().any(|&(a, b)| a < to && from < b)) {
            self.inflight_cv.wait(&mut m);
        }
    }

    /// Registers a data write to `[from, to)` of `ino` (call with the inode lock held).
    fn begin_data(&self, ino: u64, from: u64, to: u64) -> DataRange<'_> {
        self.inflight.lock().entry(ino).or_default().push((from, to));
        DataRange { fs: self, ino, range: (from, to) }
    }

    /// Reads file bytes for a reader the kernel caches for (buffered I/O): served from
    /// Concord's data cache where it has the blocks. Only a read of one block is added to
    /// it: the kernel asks for more than that from sequential readers (readahead), whose
    /// data would only push everything else out, while a random reader's block is worth
    /// keeping after the kernel drops its page.
    pub fn read(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read_vec(ino, off, len, false)
    }

    /// Reads file bytes for a reader the kernel does not cache for (O_DIRECT): a small
    /// read (up to 128 KiB) is kept in Concord's data cache; a larger one is read from
    /// the device in pieces in parallel and not kept.
    pub fn read_direct(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read_vec(ino, off, len, true)
    }

    /// [`read_then`](Self::read_then) into a vector.
    fn read_vec(&self, ino: u64, off: u64, len: usize, direct: bool) -> Result<Vec<u8>> {
        let mut got = Err(FsError::Invalid("no answer".into()));
        self.read_then(ino, off, len, direct, |r| got = r.map(<[u8]>::to_vec));
        got
    }

    /// [`read`](Self::read) (or, with `direct`, [`read_direct`](Self::read_direct))
    /// that hands the bytes, or the error, to `answer`, called exactly once. The blocks
    /// worth keeping go into the data cache only after `answer` returned: a FUSE reader
    /// has its reply by then and sends its next request to another thread, while this
    /// one copies (in a cold random read, the fresh memory of a growing cache was the
    /// biggest cost after the device read).
    pub fn read_then(&self, ino: u64, off: u64, len: usize, direct: bool, answer: impl FnOnce(Result<&[u8]>)) {
        let _l = match self.lock(&[ino], LockMode::Shared) {
            Ok(l) => l,
            Err(e) => return answer(Err(e)),
        };
        // A buffered read of one block is a random reader's (sequential readers get the
        // kernel's readahead, which asks for more): on a miss, read around it.
        let around = !direct && len as u64 <= BS && self.data.enabled();
        match self.read_locked(ino, off, len, around) {
            Err(e) => answer(Err(e)),
            Ok(r) => {
                let s = ((off - r.at) as usize).min(r.out.len());
                answer(Ok(&r.out[s..(s + len).min(r.out.len())]));
                // Small O_DIRECT reads, single-block buffered ones and their read-around
                // are kept; streaming ones would only push out everything else (and
                // copying them in halved their speed here). The inode lock is still
                // held: no write can change these blocks before they are in.
                let keep = if direct { len <= CACHE_READ_MAX } else { len as u64 <= BS };
                if keep && self.data.enabled() {
                    self.data.insert(ino, kept_blocks(&r.fetched, r.at, &r.out, r.eof));
                }
            }
        }
    }

    /// The read under the inode lock. With `around`, a read that misses Concord's data
    /// cache reads the whole aligned window of [`READ_AROUND`] blocks around it (clipped
    /// to the file), so that the caller can keep the neighbours.
    fn read_locked(&self, ino: u64, off: u64, len: usize, around: bool) -> Result<Fetched> {
        let want = off.saturating_add(len as u64);
        let (first, last) = (off / BS, want.div_ceil(BS).max(off / BS + 1));
        // Read around only a read within one window whose blocks are not all cached
        // already (a hit costs no device read, and its window stays as it is).
        let window = (first / READ_AROUND * READ_AROUND, (first / READ_AROUND + 1) * READ_AROUND);
        let around =
            around && last <= window.1 && self.data.get_range(ino, first, last - first).iter().any(Option::is_none);
        // In-flight writes to the range finish first, so that nothing stale enters the
        // cache.
        let (wait_from, wait_to) = if around { window } else { (first, last) };
        self.wait_data(ino, wait_from * BS, wait_to.saturating_mul(BS));
        let plan = self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            if d.is_dir() {
                return Err(FsError::IsDir);
            }
            if off >= d.size {
                return Ok(ReadPlan::Bytes(Vec::new()));
            }
            let end = d.size.min(want);
            if d.height == 0 {
                return Ok(ReadPlan::Bytes(d.payload[off as usize..end as usize].to_vec()));
            }
            let (from, to) = if around { (window.0 * BS, d.size.min(window.1 * BS)) } else { (off, end) };
            // `eof`: the read stops at the end of the file, so its last block counts as
            // whole (zero past the end). Without read-around, only when it was cut there.
            let eof = if around { to == d.size } else { end < want };
            Ok(ReadPlan::Extents(from, to, eof, extents(&mut tx, ino, &d, from, to)?))
        })?;
        // The device reads happen outside the filesystem lock; the inode lock keeps
        // the mapping valid meanwhile.
        match plan {
            ReadPlan::Bytes(out) => Ok(Fetched { out, at: off, fetched: Vec::new(), eof: true }),
            ReadPlan::Extents(from, to, eof, ext) => {
                let mut out = vec![0u8; (to - from) as usize];
                let fetched = self.io(read_cached(&self.dev, &self.data, ino, &ext, from, &mut out))?;
                Ok(Fetched { out, at: from, fetched, eof })
            }
        }
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        let l = self.lock(&[ino], LockMode::Exclusive)?;
        let end = off.checked_add(data.len() as u64).ok_or(FsError::TooBig)?;
        if end > max_file_size(MAX_HEIGHT) {
            return Err(FsError::TooBig);
        }
        // Whole blocks: two writes into one block must not interleave their
        // read-modify-write of it.
        self.wait_data(ino, off / BS * BS, end.div_ceil(BS) * BS);
        let planned = self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            if d.is_dir() {
                return Err(FsError::IsDir);
            }
            if data.is_empty() {
                return Ok(None);
            }
            let mut phys = Vec::new();
            let (old_size, was_stuffed) = (d.size, d.height == 0);
            if d.height == 0 && end <= STUFFED_MAX as u64 {
                d.payload[off as usize..end as usize].copy_from_slice(data);
            } else {
                unstuff(&mut tx, ino, &mut d)?;
                zero_gap(&mut tx, ino, &d, d.size, off)?;
                phys = map_for_write(&mut tx, ino, &mut d, off, end)?;
            }
            let t = now();
            d.size = d.size.max(end);
            d.mtime = t;
            d.ctime = t;
            tx.put_dinode(ino, &d);
            // Newly allocated blocks: the journal batch waits for their data
            // (ordered); overwrites may reach the disk before or after the inode.
            let fresh = phys.iter().any(|(_, f)| *f);
            // The cached copies of these blocks are stale from here on (readers wait
            // for the in-flight range before they cache anything again).
            tx.core.data.drop_range(ino, off / BS, end.div_ceil(BS));
            let (seq, guard) = if fresh { tx.commit_ordered()? } else { (tx.commit()?, None) };
            if fresh || was_stuffed || end > old_size {
                c.data_changed(ino, seq);
            }
            Ok(Some((phys, guard)))
        })?;
        let Some((phys, guard)) = planned else { return Ok(0) };
        if !phys.is_empty() {
            // The data I/O happens outside the filesystem lock and, once the range is
            // registered, outside the inode lock: other writes to this file proceed,
            // and readers and writers of these blocks wait for the range.
            let _range = self.begin_data(ino, off / BS * BS, end.div_ceil(BS) * BS);
            drop(l);
            let r = write_blocks(self.dev.as_ref(), &phys, off, data);
            if r.is_err() {
                if let Some(g) = guard {
                    g.failed();
                }
                return self.io(r).map(|_| 0);
            }
        }
        Ok(data.len())
    }

    /// fallocate(2): allocate (zeroed) blocks, or punch a hole (with `keep_size`).
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, keep_size: bool, punch_hole: bool) -> Result<()> {
        if len == 0 {
            return Err(FsError::Invalid("fallocate of length 0".into()));
        }
        if punch_hole && !keep_size {
            return Err(FsError::NotSupported("PUNCH_HOLE without KEEP_SIZE".into()));
        }
        let end = off.checked_add(len).ok_or(FsError::TooBig)?;
        if end > max_file_size(MAX_HEIGHT) {
            return Err(FsError::TooBig);
        }
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.wait_data(ino, 0, u64::MAX);
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            if !d.is_reg() {
                return Err(if d.is_dir() {
                    FsError::IsDir
                } else {
                    FsError::Invalid("fallocate of a special file".into())
                });
            }
            let t = now();
            if punch_hole {
                let to = end.min(d.size);
                punch(&mut tx, ino, &mut d, off, to)?;
            } else {
                if d.height == 0 && end > STUFFED_MAX as u64 {
                    unstuff(&mut tx, ino, &mut d)?;
                }
                if !keep_size && end > d.size {
                    zero_gap(&mut tx, ino, &d, d.size, end)?;
                }
                if d.height > 0 {
                    allocate_zeroed(&mut tx, ino, &mut d, off, end)?;
                }
                if !keep_size && end > d.size {
                    d.size = end;
                }
            }
            d.ctime = t;
            d.mtime = t;
            tx.put_dinode(ino, &d);
            let seq = tx.commit()?;
            c.data_changed(ino, seq);
            Ok(())
        })
    }

    /// Next offset at or after `off` holding data (`data`) or a hole (`!data`), as
    /// SEEK_DATA / SEEK_HOLE; None past the end for SEEK_DATA.
    pub fn seek(&self, ino: u64, off: u64, data: bool) -> Result<Option<u64>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            if off >= d.size {
                return Ok(None);
            }
            if d.height == 0 {
                return Ok(Some(if data { off } else { d.size }));
            }
            let mut lb = off / BLOCK_SIZE as u64;
            let last = d.size.div_ceil(BLOCK_SIZE as u64);
            while lb < last {
                let (p, n) = bmap::lookup_extent(&mut tx, ino, &d, lb, last - lb)?;
                if (p != 0) == data {
                    return Ok(Some((lb * BLOCK_SIZE as u64).max(off)));
                }
                lb += n;
            }
            Ok(if data { None } else { Some(d.size) })
        })
    }
}

/// Moves a stuffed file's bytes to a data block and starts its block map.
fn unstuff(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode) -> Result<()> {
    if d.height > 0 {
        return Ok(());
    }
    let old = d.size.min(STUFFED_MAX as u64) as usize;
    let mut first = None;
    if old > 0 {
        let a = tx.alloc(ino, BlockState::Used)?;
        let mut b = vec![0u8; BLOCK_SIZE];
        b[..old].copy_from_slice(&d.payload[..old]);
        tx.core.dev.write_at(a * BLOCK_SIZE as u64, &b)?;
        tx.ordered = true;
        first = Some(a);
    }
    d.payload.fill(0);
    d.height = 1;
    if let Some(a) = first {
        d.set_ptr(0, a);
        d.blocks += 1;
    }
    Ok(())
}

const BS: u64 = BLOCK_SIZE as u64;

/// What a read needs once the filesystem lock is released.
enum ReadPlan {
    Bytes(Vec<u8>),
    /// The bytes to read `[from, to)` (clamped to the size), whether `to` is the end of
    /// the file, and the extents covering them.
    Extents(u64, u64, bool, Vec<(u64, u64, u64)>),
}

/// A read's bytes, from file offset `at`; the runs of blocks read from the device (first
/// logical block, count); and whether `out` ends at the end of the file.
struct Fetched {
    out: Vec<u8>,
    at: u64,
    fetched: Vec<(u64, u64)>,
    eof: bool,
}

/// (logical block, device block or 0 for a hole, block count) covering `[off, end)`.
fn extents(tx: &mut Tx<'_>, ino: u64, d: &Dinode, off: u64, end: u64) -> Result<Vec<(u64, u64, u64)>> {
    let mut out = Vec::new();
    let mut lb = off / BS;
    let last = end.div_ceil(BS);
    while lb < last {
        let (p, n) = bmap::lookup_extent(tx, ino, d, lb, last - lb)?;
        out.push((lb, p, n));
        lb += n;
    }
    Ok(out)
}

/// Device reads of at most this many blocks each; a larger read runs its pieces in
/// parallel (the device serves several requests at once faster than one after another).
const READ_CHUNK: u64 = 32;
/// Reader threads, for device reads in flight at once.
const READ_PARALLEL: usize = 8;
/// O_DIRECT reads up to this size go into the data cache.
const CACHE_READ_MAX: usize = 128 << 10;
/// The aligned window, in blocks, that a buffered single-block read missing the data
/// cache reads from the device (64 KiB). On the disks measured a 64 KiB read costs
/// little more than 4 KiB, and a random reader's next misses often fall in it: what a
/// buffered host filesystem gets from the page cache of its device (docs/PERFORMANCE.md,
/// randread_4k_cold). The window is read under the inode's glock and lock like the block
/// asked for, and dropped with them, so it is never stale.
const READ_AROUND: u64 = 16;

/// Reads file bytes `[off, off + out.len())` through `ext` (from [`extents`]), serving
/// blocks from `cache` where it has them; returns the runs read from the device (first
/// logical block, count), for the caller to cache. Device reads go in pieces of
/// [`READ_CHUNK`] blocks, several at once.
fn read_cached(
    dev: &Arc<dyn BlockDevice>,
    cache: &DataCache,
    ino: u64,
    ext: &[(u64, u64, u64)],
    off: u64,
    out: &mut [u8],
) -> Result<Vec<(u64, u64)>> {
    let end = off + out.len() as u64;
    let Some(&(first, _, _)) = ext.first() else { return Ok(Vec::new()) };
    let last = ext.last().map_or(first, |&(lb, _, n)| lb + n);
    let cached = cache.get_range(ino, first, last - first);
    // Copies block `lb`'s bytes that the caller asked for into `out`.
    let mut put = |lb: u64, b: &[u8]| {
        let (s, e) = ((lb * BS).max(off), ((lb + 1) * BS).min(end));
        if s < e {
            out[(s - off) as usize..(e - off) as usize]
                .copy_from_slice(&b[(s - lb * BS) as usize..(e - lb * BS) as usize]);
        }
    };
    // Runs of missing blocks: (first logical block, first device block, count).
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for &(lb, p, n) in ext {
        if p == 0 {
            continue; // a hole: `out` is zeroed already
        }
        for i in 0..n {
            let b = lb + i;
            match &cached[(b - first) as usize] {
                Some(c) => put(b, &c[..]),
                None => match runs.last_mut() {
                    Some(r) if r.0 + r.2 == b && r.1 + r.2 == p + i && r.2 < READ_CHUNK => r.2 += 1,
                    _ => runs.push((b, p + i, 1)),
                },
            }
        }
    }
    // Copies a run read from the device into `out`.
    let mut take = |r: &(u64, u64, u64), buf: &[u8]| {
        for (i, chunk) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
            put(r.0 + i as u64, chunk);
        }
    };
    let fetched = runs.iter().map(|&(lb, _, n)| (lb, n)).collect();
    let Some((first_run, rest)) = runs.split_first() else { return Ok(fetched) };
    // Runs after the first go to the reader threads, so that several device reads are
    // in flight at once (the device serves them much faster together than one after
    // the other); this thread reads the first meanwhile, in its own buffer.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for (i, &(_, p, n)) in rest.iter().enumerate() {
        let (dev, done) = (dev.clone(), done_tx.clone());
        readers().spawn(Box::new(move || {
            let mut buf = vec![0u8; (n * BS) as usize];
            let r = dev.read_at(p * BS, &mut buf).map(|_| buf).map_err(FsError::from);
            let _ = done.send((i, r));
        }));
    }
    drop(done_tx);
    let mine = with_scratch((first_run.2 * BS) as usize, |buf| -> Result<()> {
        dev.read_at(first_run.1 * BS, buf)?;
        take(first_run, buf);
        Ok(())
    });
    let mut bufs: Vec<Option<Result<Vec<u8>>>> = rest.iter().map(|_| None).collect();
    for (i, r) in done_rx {
        bufs[i] = Some(r);
    }
    mine?;
    for (r, b) in rest.iter().zip(bufs) {
        let buf = b.unwrap_or_else(|| Err(FsError::Invalid("a device read was lost".into())))?;
        take(r, &buf);
    }
    Ok(fetched)
}

/// Copies for the data cache of the blocks of `fetched` (runs: first logical block,
/// count) that `out`, the bytes of the file from `off`, holds whole; with `eof` (`out`
/// ends at the end of the file) the last block counts as whole, zero-filled past the
/// end: no read serves bytes past the end, and a write that extends the file drops
/// the blocks it zeroes from the cache. One allocation per block, not zeroed first.
fn kept_blocks(fetched: &[(u64, u64)], off: u64, out: &[u8], eof: bool) -> Vec<(u64, Arc<Block>)> {
    let end = off + out.len() as u64;
    let mut kept = Vec::new();
    for &(first, n) in fetched {
        for lb in first..first + n {
            let (s, e) = (lb * BS, (lb + 1) * BS);
            if s < off || s >= end || (e > end && !eof) {
                continue;
            }
            let have = &out[(s - off) as usize..(e.min(end) - off) as usize];
            let b = match <&Block>::try_from(have) {
                Ok(whole) => Arc::new(*whole),
                Err(_) => {
                    let mut tail = [0u8; BLOCK_SIZE];
                    tail[..have.len()].copy_from_slice(have);
                    Arc::new(tail)
                }
            };
            kept.push((lb, b));
        }
    }
    kept
}

/// Threads that run device reads for [`read_cached`].
struct Readers {
    jobs: parking_lot::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl Readers {
    fn spawn(&self, job: Box<dyn FnOnce() + Send>) {
        // The workers live as long as the process: a send cannot fail.
        let _ = self.jobs.lock().send(job);
    }
}

/// The process's reader threads ([`READ_PARALLEL`] of them), started on first use.
fn readers() -> &'static Readers {
    static READERS: std::sync::OnceLock<Readers> = std::sync::OnceLock::new();
    READERS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let rx = Arc::new(parking_lot::Mutex::new(rx));
        for i in 0..READ_PARALLEL {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("concord-read-{i}")).spawn(move || loop {
                let job = rx.lock().recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => break,
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "starting a reader thread");
            }
        }
        Readers { jobs: parking_lot::Mutex::new(tx) }
    })
}

/// Reads mapped file bytes inside a transaction (system files at mount).
pub(super) fn read_mapped(tx: &mut Tx<'_>, ino: u64, d: &Dinode, off: u64, out: &mut [u8]) -> Result<()> {
    let ext = extents(tx, ino, d, off, off + out.len() as u64)?;
    read_cached(&tx.core.dev, &tx.core.data, ino, &ext, off, out).map(drop)
}

/// Maps (allocating where needed) the blocks of `[off, end)`: one (device block,
/// newly allocated) per logical block. Marks the transaction ordered when any is new.
fn map_for_write(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, off: u64, end: u64) -> Result<Vec<(u64, bool)>> {
    let (first, last) = (off / BS, end.div_ceil(BS));
    let mut phys = Vec::with_capacity((last - first) as usize);
    let mut goal = ino;
    for lb in first..last {
        let (p, fresh) = bmap::map_alloc(tx, ino, d, lb, goal)?;
        goal = p + 1;
        tx.ordered |= fresh;
        phys.push((p, fresh));
    }
    Ok(phys)
}

/// Writes `data` at file offset `off` into the mapped blocks `phys` (from
/// [`map_for_write`]), a run of contiguous device blocks at a time. Partial head and
/// tail blocks keep their old bytes, or zeros when newly allocated.
fn write_blocks(dev: &dyn BlockDevice, phys: &[(u64, bool)], off: u64, data: &[u8]) -> Result<()> {
    let end = off + data.len() as u64;
    let first = off / BS;
    let mut i = 0usize;
    while i < phys.len() {
        let mut j = i + 1;
        while j < phys.len() && phys[j].0 == phys[j - 1].0 + 1 {
            j += 1;
        }
        let run_start = (first + i as u64) * BS;
        let run_end = (first + j as u64) * BS;
        with_scratch((run_end - run_start) as usize, |buf| -> Result<()> {
            let head_partial = off > run_start;
            let tail_partial = end < run_end;
            // Bytes of partial first and last blocks outside the write keep what the
            // block held (zeros for a new block).
            if head_partial {
                buf[..BLOCK_SIZE].fill(0);
                if !phys[i].1 {
                    dev.read_at(phys[i].0 * BS, &mut buf[..BLOCK_SIZE])?;
                }
            }
            if tail_partial && (j - 1 != i || !head_partial) {
                let k = buf.len() - BLOCK_SIZE;
                buf[k..].fill(0);
                if !phys[j - 1].1 {
                    dev.read_at(phys[j - 1].0 * BS, &mut buf[k..])?;
                }
            }
            let ds = off.max(run_start);
            let de = end.min(run_end);
            buf[(ds - run_start) as usize..(de - run_start) as usize]
                .copy_from_slice(&data[(ds - off) as usize..(de - off) as usize]);
            dev.write_at(phys[i].0 * BS, buf)?;
            Ok(())
        })?;
        i = j;
    }
    Ok(())
}

/// Runs `f` on a 4 KiB-aligned buffer of `len` bytes (contents undefined). Buffers up
/// to [`SCRATCH_MAX`] are kept per thread and reused: O_DIRECT needs aligned buffers
/// (an unaligned one costs the device a bounce copy), and a fresh megabyte costs a page
/// fault per page.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local!(static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
    let run = |v: &mut Vec<u8>| {
        if v.len() < len + BLOCK_SIZE {
            *v = vec![0u8; len + BLOCK_SIZE];
        }
        let a = v.as_ptr().align_offset(BLOCK_SIZE);
        f(&mut v[a..a + len])
    };
    if len > SCRATCH_MAX {
        return run(&mut Vec::new());
    }
    SCRATCH.with(|s| run(&mut s.borrow_mut()))
}

/// Largest scratch buffer a thread keeps.
const SCRATCH_MAX: usize = 1 << 20;

/// Zeroes bytes `[from, to)` of the file's mapped blocks in place, skipping holes.
fn zero_range(tx: &mut Tx<'_>, ino: u64, d: &Dinode, from: u64, to: u64) -> Result<()> {
    tx.core.data.drop_range(ino, from / BS, to.div_ceil(BS));
    let mut pos = from;
    while pos < to {
        let lb = pos / BS;
        let last = to.div_ceil(BS);
        let (p, n) = bmap::lookup_extent(tx, ino, d, lb, last - lb)?;
        let ext_end = ((lb + n) * BS).min(to);
        if p != 0 {
            let mut buf = vec![0u8; ((lb + n) * BS - lb * BS) as usize];
            let head = (pos - lb * BS) as usize;
            let tail = (ext_end - lb * BS) as usize;
            // Keep the bytes outside [pos, ext_end) of the first and last blocks.
            if head > 0 {
                tx.core.dev.read_at(p * BS, &mut buf[..BLOCK_SIZE])?;
            }
            if tail < buf.len() {
                let k = buf.len() - BLOCK_SIZE;
                tx.core.dev.read_at((p + n - 1) * BS, &mut buf[k..])?;
            }
            buf[head..tail].fill(0);
            tx.core.dev.write_at(p * BS, &buf)?;
        }
        pos = ext_end;
    }
    Ok(())
}

/// Before a file grows from `old` to `new`: bytes past the old end may hold what an
/// uncommitted write left there before a crash; they must read as zeros.
fn zero_gap(tx: &mut Tx<'_>, ino: u64, d: &Dinode, old: u64, new: u64) -> Result<()> {
    if d.height > 0 && new > old {
        zero_range(tx, ino, d, old, new)?;
    }
    Ok(())
}

pub(super) fn truncate(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, size: u64) -> Result<()> {
    tx.core.data.drop_range(ino, size / BS, u64::MAX);
    if size > max_file_size(MAX_HEIGHT) {
        return Err(FsError::TooBig);
    }
    if d.height == 0 {
        if size > STUFFED_MAX as u64 {
            unstuff(tx, ino, d)?;
        } else {
            if size < d.size {
                d.payload[size as usize..].fill(0);
            }
            d.size = size;
            return Ok(());
        }
    }
    zero_gap(tx, ino, d, d.size, size)?;
    bmap::grow_for_size(tx, ino, d, size)?;
    if size < d.size {
        let keep = size.div_ceil(BS);
        bmap::free_range(tx, ino, d, keep, u64::MAX, false)?;
        if !size.is_multiple_of(BS) {
            zero_range(tx, ino, d, size, keep * BS)?;
        }
        if size == 0 {
            d.height = 0;
            d.payload.fill(0);
        }
    }
    d.size = size;
    Ok(())
}

fn punch(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, from: u64, to: u64) -> Result<()> {
    tx.core.data.drop_range(ino, from / BS, to.div_ceil(BS));
    if from >= to {
        return Ok(());
    }
    if d.height == 0 {
        d.payload[from as usize..to as usize].fill(0);
        return Ok(());
    }
    let first_full = from.div_ceil(BS);
    let last_full = to / BS;
    if first_full < last_full {
        bmap::free_range(tx, ino, d, first_full, last_full, false)?;
        zero_range(tx, ino, d, from, first_full * BS)?;
        zero_range(tx, ino, d, last_full * BS, to)?;
    } else {
        zero_range(tx, ino, d, from, to)?;
    }
    Ok(())
}

fn allocate_zeroed(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, from: u64, to: u64) -> Result<()> {
    const RUN: u64 = 256; // zero up to 1 MiB per write
    let zero = vec![0u8; (RUN * BS) as usize];
    let mut goal = ino;
    let mut run: Option<(u64, u64)> = None; // (first device block, blocks)
    for lb in from / BS..to.div_ceil(BS) {
        let (p, fresh) = bmap::map_alloc(tx, ino, d, lb, goal)?;
        goal = p + 1;
        if !fresh {
            continue;
        }
        tx.ordered = true;
        run = match run {
            Some((s, n)) if s + n == p && n < RUN => Some((s, n + 1)),
            Some((s, n)) => {
                tx.core.dev.write_at(s * BS, &zero[..(n * BS) as usize])?;
                Some((p, 1))
            }
            None => Some((p, 1)),
        };
    }
    if let Some((s, n)) = run {
        tx.core.dev.write_at(s * BS, &zero[..(n * BS) as usize])?;
    }
    Ok(())
}
