//! A simulated device for crash tests (after TigerBeetle's simulated storage).
//!
//! It keeps two images: the *live* image that reads see, and the *durable*
//! image that survives a power cut. Every write lands in the live image and is
//! remembered, one entry per 4096-byte block, as pending. [`BlockDevice::flush`]
//! moves all pending writes into the durable image. [`CrashDevice::power_cut`]
//! throws the live image away and rebuilds it from the durable image plus a
//! subset of the pending block writes chosen by [`CutMode`] (optionally tearing
//! the last one at 512-byte sector granularity); afterwards every I/O fails
//! with [`DeviceError::PoweredOff`] until [`CrashDevice::restart`].
//! [`CrashDevice::fail_after`] injects an I/O error after a countdown and
//! [`CrashDevice::misdirect_next_write`] sends a write to the wrong place.
//!
//! The handle is cheap to clone: clones share one device, so a test can give
//! an `Arc<dyn BlockDevice>` to the code under test and keep a clone to cut
//! power with.

use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::device::{check_io, BlockDevice, DeviceError, BLOCK_SIZE, SECTOR_SIZE};

/// Which unflushed writes survive a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// None of them.
    DropAllUnflushed,
    /// Each pending block write survives with probability 1/2, independently.
    RandomSubset,
    /// As `RandomSubset`, and the last surviving block write is torn: only a
    /// strict prefix of its 512-byte sectors (possibly none) reaches the media.
    RandomSubsetTearLast,
}

/// Operation counters of a [`CrashDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashStats {
    /// Successful `write_at` calls.
    pub writes: u64,
    /// Successful flushes.
    pub flushes: u64,
    /// Successful reads.
    pub reads: u64,
    /// Power cuts so far.
    pub power_cuts: u64,
}

#[derive(Debug)]
struct Inner {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Block writes since the last flush, oldest first: (byte offset, contents).
    pending: Vec<(u64, Box<[u8]>)>,
    rng: SmallRng,
    powered_off: bool,
    /// Writes/flushes left before the injected failure; `None` = no injection.
    fail_countdown: Option<u64>,
    /// Byte offset the next write really goes to (a misdirected write).
    misdirect_to: Option<u64>,
    failing: bool,
    stats: CrashStats,
}

/// A simulated device that can lose unflushed writes; see the module docs.
#[derive(Clone, Debug)]
pub struct CrashDevice {
    inner: Arc<Mutex<Inner>>,
}

impl CrashDevice {
    /// A zero-filled device of `len` bytes (rounded down to whole blocks);
    /// `seed` drives every random choice of [`CrashDevice::power_cut`].
    pub fn new(len: u64, seed: u64) -> CrashDevice {
        let len = usize::try_from(len).expect("CrashDevice larger than the address space");
        CrashDevice::from_image(vec![0u8; len], seed)
    }

    /// A device whose live and durable images are both `image`.
    pub fn from_image(mut image: Vec<u8>, seed: u64) -> CrashDevice {
        image.truncate(image.len() / BLOCK_SIZE * BLOCK_SIZE);
        CrashDevice {
            inner: Arc::new(Mutex::new(Inner {
                durable: image.clone(),
                live: image,
                pending: Vec::new(),
                rng: SmallRng::seed_from_u64(seed),
                powered_off: false,
                fail_countdown: None,
                misdirect_to: None,
                failing: false,
                stats: CrashStats::default(),
            })),
        }
    }

    /// Cuts power: the live image becomes the durable image plus the subset
    /// of unflushed block writes that `mode` keeps, applied in order. That
    /// result is what is on the media now, so it also becomes the durable
    /// image. All I/O fails with `PoweredOff` until [`CrashDevice::restart`].
    pub fn power_cut(&self, mode: CutMode) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let pending = std::mem::take(&mut inner.pending);
        let kept: Vec<(u64, Box<[u8]>)> = match mode {
            CutMode::DropAllUnflushed => Vec::new(),
            CutMode::RandomSubset | CutMode::RandomSubsetTearLast => {
                pending.into_iter().filter(|_| inner.rng.gen_bool(0.5)).collect()
            }
        };
        // Bytes of the last kept write that reach the media: all of them, or a
        // strict sector prefix when tearing.
        let last_len = match (mode, kept.last()) {
            (CutMode::RandomSubsetTearLast, Some((_, data))) => {
                inner.rng.gen_range(0..data.len() / SECTOR_SIZE) * SECTOR_SIZE
            }
            (_, Some((_, data))) => data.len(),
            (_, None) => 0,
        };
        let n = kept.len();
        for (i, (off, data)) in kept.iter().enumerate() {
            let len = if i + 1 == n { last_len } else { data.len() };
            let off = *off as usize;
            inner.durable[off..off + len].copy_from_slice(&data[..len]);
        }
        inner.live.clone_from(&inner.durable);
        inner.powered_off = true;
        inner.stats.power_cuts += 1;
    }

    /// Powers the device back on (a reboot) and cancels any injected failure.
    pub fn restart(&self) {
        let mut g = self.inner.lock();
        g.powered_off = false;
        g.failing = false;
        g.fail_countdown = None;
    }

    /// Makes the `n`-th following write or flush fail with
    /// [`DeviceError::Injected`], and every write and flush after it, until
    /// [`CrashDevice::restart`]. `n = 0` behaves like `n = 1` (the next one
    /// fails). A failed write changes nothing. Reads keep working.
    pub fn fail_after(&self, n_ops: u64) {
        let mut g = self.inner.lock();
        g.failing = false;
        g.fail_countdown = Some(n_ops.max(1));
    }

    /// Makes the next write land at byte offset `to` instead of where it was
    /// aimed, and still report success (a misdirected write). `to` must be
    /// block-aligned and leave room for the write; otherwise the write fails
    /// with `OutOfRange`/`Unaligned` as if aimed there.
    pub fn misdirect_next_write(&self, to: u64) {
        self.inner.lock().misdirect_to = Some(to);
    }

    /// A copy of what would survive a power cut that dropped every unflushed write.
    pub fn durable_image(&self) -> Vec<u8> {
        self.inner.lock().durable.clone()
    }

    /// A copy of what reads currently see.
    pub fn live_image(&self) -> Vec<u8> {
        self.inner.lock().live.clone()
    }

    /// Number of block writes not yet flushed.
    pub fn pending_writes(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// Operation counters.
    pub fn stats(&self) -> CrashStats {
        self.inner.lock().stats
    }
}

impl Inner {
    fn check_mutation(&mut self) -> Result<(), DeviceError> {
        if self.powered_off {
            return Err(DeviceError::PoweredOff);
        }
        if self.failing {
            return Err(DeviceError::Injected);
        }
        if let Some(left) = self.fail_countdown {
            if left <= 1 {
                self.failing = true;
                self.fail_countdown = None;
                return Err(DeviceError::Injected);
            }
            self.fail_countdown = Some(left - 1);
        }
        Ok(())
    }
}

impl BlockDevice for CrashDevice {
    fn len(&self) -> u64 {
        self.inner.lock().live.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let mut g = self.inner.lock();
        if g.powered_off {
            return Err(DeviceError::PoweredOff);
        }
        check_io(offset, buf.len(), g.live.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&g.live[start..start + buf.len()]);
        g.stats.reads += 1;
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        let mut g = self.inner.lock();
        check_io(offset, buf.len(), g.live.len() as u64)?;
        g.check_mutation()?;
        let offset = match g.misdirect_to.take() {
            Some(to) => {
                check_io(to, buf.len(), g.live.len() as u64)?;
                to
            }
            None => offset,
        };
        let start = offset as usize;
        g.live[start..start + buf.len()].copy_from_slice(buf);
        for (i, chunk) in buf.chunks(BLOCK_SIZE).enumerate() {
            let off = offset + (i * BLOCK_SIZE) as u64;
            g.pending.push((off, chunk.into()));
        }
        g.stats.writes += 1;
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut g = self.inner.lock();
        g.check_mutation()?;
        let inner = &mut *g;
        for (off, data) in inner.pending.drain(..) {
            let off = off as usize;
            inner.durable[off..off + data.len()].copy_from_slice(&data);
        }
        inner.stats.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = BLOCK_SIZE as u64;

    fn blk(v: u8) -> Vec<u8> {
        vec![v; BLOCK_SIZE]
    }

    fn block_of(img: &[u8], n: usize) -> &[u8] {
        &img[n * BLOCK_SIZE..(n + 1) * BLOCK_SIZE]
    }

    #[test]
    fn flush_makes_writes_durable() {
        let dev = CrashDevice::new(4 * BS, 1);
        dev.write_at(0, &blk(1)).unwrap();
        assert_eq!(block_of(&dev.durable_image(), 0), &blk(0)[..]);
        assert_eq!(dev.pending_writes(), 1);
        dev.flush().unwrap();
        assert_eq!(block_of(&dev.durable_image(), 0), &blk(1)[..]);
        assert_eq!(dev.pending_writes(), 0);
        dev.power_cut(CutMode::DropAllUnflushed);
        dev.restart();
        let mut b = blk(9);
        dev.read_at(0, &mut b).unwrap();
        assert_eq!(b, blk(1));
        assert_eq!(dev.stats().flushes, 1);
        assert_eq!(dev.stats().writes, 1);
    }

    #[test]
    fn power_cut_forgets_unflushed_writes() {
        let dev = CrashDevice::new(4 * BS, 1);
        dev.write_at(0, &blk(1)).unwrap();
        dev.flush().unwrap();
        dev.write_at(0, &blk(2)).unwrap();
        dev.write_at(BS, &blk(3)).unwrap();
        let mut b = blk(0);
        dev.read_at(0, &mut b).unwrap();
        assert_eq!(b, blk(2), "reads see the live image");
        dev.power_cut(CutMode::DropAllUnflushed);
        assert!(matches!(dev.read_at(0, &mut b), Err(DeviceError::PoweredOff)));
        assert!(matches!(dev.write_at(0, &b), Err(DeviceError::PoweredOff)));
        assert!(matches!(dev.flush(), Err(DeviceError::PoweredOff)));
        dev.restart();
        dev.read_at(0, &mut b).unwrap();
        assert_eq!(b, blk(1));
        dev.read_at(BS, &mut b).unwrap();
        assert_eq!(b, blk(0));
    }

    #[test]
    fn random_subset_keeps_some_and_applies_in_order() {
        let mut seen_kept = false;
        let mut seen_dropped = false;
        for seed in 0..64 {
            let dev = CrashDevice::new(4 * BS, seed);
            // Two writes to block 0 then one to block 1: the survivor of block 0
            // is 1, 2 or untouched; if both survive, 2 wins (applied in order).
            dev.write_at(0, &blk(1)).unwrap();
            dev.write_at(0, &blk(2)).unwrap();
            dev.write_at(BS, &[blk(3), blk(4)].concat()).unwrap();
            dev.power_cut(CutMode::RandomSubset);
            dev.restart();
            let img = dev.live_image();
            assert!([0u8, 1, 2].contains(&img[0]));
            assert!(block_of(&img, 0).iter().all(|&b| b == img[0]), "no tearing in RandomSubset");
            for (n, v) in [(1, 3u8), (2, 4u8)] {
                let b = block_of(&img, n);
                assert!(b == &blk(v)[..] || b == &blk(0)[..]);
                if b == &blk(v)[..] {
                    seen_kept = true;
                } else {
                    seen_dropped = true;
                }
            }
            assert_eq!(dev.durable_image(), img);
        }
        assert!(seen_kept && seen_dropped);
    }

    #[test]
    fn tear_last_keeps_a_sector_prefix() {
        let mut seen_torn = false;
        for seed in 0..64 {
            let dev = CrashDevice::new(2 * BS, seed);
            dev.write_at(0, &blk(5)).unwrap();
            dev.power_cut(CutMode::RandomSubsetTearLast);
            dev.restart();
            let img = dev.live_image();
            let b = block_of(&img, 0);
            let prefix = b.iter().take_while(|&&x| x == 5).count();
            assert_eq!(prefix % SECTOR_SIZE, 0);
            assert!(prefix < BLOCK_SIZE, "the last kept write is never complete");
            assert!(b[prefix..].iter().all(|&x| x == 0));
            if prefix > 0 {
                seen_torn = true;
            }
        }
        assert!(seen_torn);
    }

    #[test]
    fn fail_after_counts_writes_and_flushes() {
        let dev = CrashDevice::new(4 * BS, 1);
        dev.fail_after(3);
        dev.write_at(0, &blk(1)).unwrap();
        dev.flush().unwrap();
        assert!(matches!(dev.write_at(BS, &blk(2)), Err(DeviceError::Injected)));
        assert!(matches!(dev.flush(), Err(DeviceError::Injected)));
        let mut b = blk(0);
        dev.read_at(BS, &mut b).unwrap();
        assert_eq!(b, blk(0), "a failed write changes nothing");
        dev.read_at(0, &mut b).unwrap();
        assert_eq!(b, blk(1));
        dev.power_cut(CutMode::RandomSubset);
        dev.restart();
        dev.write_at(BS, &blk(2)).unwrap();
        dev.fail_after(0);
        assert!(matches!(dev.flush(), Err(DeviceError::Injected)));
    }

    #[test]
    fn misdirected_write_lands_elsewhere() {
        let dev = CrashDevice::new(4 * BS, 1);
        dev.misdirect_next_write(3 * BS);
        dev.write_at(BS, &blk(6)).unwrap();
        dev.write_at(2 * BS, &blk(7)).unwrap();
        let img = dev.live_image();
        assert_eq!(block_of(&img, 1), &blk(0)[..]);
        assert_eq!(block_of(&img, 2), &blk(7)[..]);
        assert_eq!(block_of(&img, 3), &blk(6)[..]);
    }

    #[test]
    fn clones_share_one_device() {
        let dev = CrashDevice::new(2 * BS, 1);
        let shared: Arc<dyn BlockDevice> = Arc::new(dev.clone());
        shared.write_at(0, &blk(8)).unwrap();
        dev.power_cut(CutMode::DropAllUnflushed);
        assert!(matches!(shared.flush(), Err(DeviceError::PoweredOff)));
    }
}
