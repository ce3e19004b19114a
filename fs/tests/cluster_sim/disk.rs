//! One shared simulated disk, seen by each node through its own [`NodeDisk`].
//!
//! Every write lands in the one live image at once (the next read by any node sees
//! it) and is remembered as pending *for the node that wrote it*, with the block's
//! contents before the write, until that node flushes. A crash of node N (its power
//! cut) loses a random subset of N's pending block writes, and may tear the last one
//! it keeps at 512-byte sector granularity; the other nodes' writes are untouched.
//! A lost write puts back what the block held before it, unless another node has
//! written the block since (then the other node's write stands). A crashed node's
//! view refuses every write and flush until the node is revived (its fence).
//!
//! This is stricter than a real shared disk, where a write that returned is safe
//! from one node's crash: it checks that a node flushes what it wrote before anyone
//! may rely on it (before a lock it wrote under leaves the node, before an fsync
//! returns).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use concord_journal::{BlockDevice, DeviceError, BLOCK_SIZE};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::Rng;

const SECTOR: usize = 512;

/// One block write not yet flushed by its node.
#[derive(Debug)]
struct Pending {
    block: u64,
    /// The write's number (all nodes count together).
    seq: u64,
    before: Box<[u8]>,
    before_owner: Option<(usize, u64)>,
}

#[derive(Debug)]
struct Inner {
    live: Vec<u8>,
    /// Per node: block writes since its last flush, oldest first.
    pending: Vec<Vec<Pending>>,
    /// Per block: the node and write number of its last write since load.
    owner: BTreeMap<u64, (usize, u64)>,
    fenced: Vec<bool>,
    next_seq: u64,
}

/// The shared disk.
#[derive(Debug)]
pub struct SharedDisk {
    inner: Mutex<Inner>,
}

impl SharedDisk {
    pub fn new(image: Vec<u8>, nodes: usize) -> Arc<SharedDisk> {
        Arc::new(SharedDisk {
            inner: Mutex::new(Inner {
                live: image,
                pending: (0..nodes).map(|_| Vec::new()).collect(),
                owner: BTreeMap::new(),
                fenced: vec![false; nodes],
                next_seq: 1,
            }),
        })
    }

    /// Node `node`'s view.
    pub fn view(self: &Arc<Self>, node: usize) -> Arc<NodeDisk> {
        Arc::new(NodeDisk { disk: self.clone(), node })
    }

    /// Block writes pending (not flushed) for `node`.
    pub fn pending(&self, node: usize) -> usize {
        self.inner.lock().pending[node].len()
    }

    /// Node `node` loses power: each of its pending block writes survives with
    /// probability 1/2; with `tear`, the last survivor keeps only a sector prefix.
    /// Its view refuses writes from now on. Returns how many block writes were lost
    /// or torn.
    pub fn crash(&self, node: usize, rng: &mut SmallRng, tear: bool) -> usize {
        let mut g = self.inner.lock();
        let g = &mut *g;
        g.fenced[node] = true;
        let pending = std::mem::take(&mut g.pending[node]);
        let keep: Vec<bool> = pending.iter().map(|_| rng.gen_bool(0.5)).collect();
        let last_kept = keep.iter().rposition(|k| *k);
        let mut settled: BTreeSet<u64> = BTreeSet::new();
        let mut lost = 0;
        for (i, p) in pending.iter().enumerate().rev() {
            if settled.contains(&p.block) {
                continue;
            }
            // Another node wrote the block since: its write stands.
            if g.owner.get(&p.block) != Some(&(node, p.seq)) {
                settled.insert(p.block);
                continue;
            }
            let off = p.block as usize * BLOCK_SIZE;
            if keep[i] {
                settled.insert(p.block);
                if tear && Some(i) == last_kept {
                    let sectors = rng.gen_range(0..BLOCK_SIZE / SECTOR);
                    let cut = sectors * SECTOR;
                    g.live[off + cut..off + BLOCK_SIZE].copy_from_slice(&p.before[cut..]);
                    lost += 1;
                }
                continue;
            }
            g.live[off..off + BLOCK_SIZE].copy_from_slice(&p.before);
            match p.before_owner {
                Some(o) => g.owner.insert(p.block, o),
                None => g.owner.remove(&p.block),
            };
            lost += 1;
        }
        lost
    }

    /// A crashed node comes back (a reboot): its view writes again.
    pub fn revive(&self, node: usize) {
        self.inner.lock().fenced[node] = false;
    }
}

/// What node `node` sees of the shared disk.
#[derive(Debug)]
pub struct NodeDisk {
    disk: Arc<SharedDisk>,
    node: usize,
}

fn fenced(op: &'static str, offset: u64) -> DeviceError {
    DeviceError::Io { op, offset, source: std::io::Error::other("this node crashed (fenced)") }
}

// is_multiple_of needs Rust 1.87; the workspace's rust-version is 1.85.
#[allow(clippy::manual_is_multiple_of)]
fn check(offset: u64, len: usize, size: usize) -> Result<(), DeviceError> {
    let bs = BLOCK_SIZE as u64;
    if offset % bs != 0 || len % BLOCK_SIZE != 0 {
        return Err(DeviceError::Unaligned { offset, len });
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= size as u64 => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len, size: size as u64 }),
    }
}

impl BlockDevice for NodeDisk {
    fn len(&self) -> u64 {
        self.disk.inner.lock().live.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let g = self.disk.inner.lock();
        check(offset, buf.len(), g.live.len())?;
        let s = offset as usize;
        buf.copy_from_slice(&g.live[s..s + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        let mut g = self.disk.inner.lock();
        let g = &mut *g;
        if g.fenced[self.node] {
            return Err(fenced("write", offset));
        }
        check(offset, buf.len(), g.live.len())?;
        for (i, chunk) in buf.chunks(BLOCK_SIZE).enumerate() {
            let block = offset / BLOCK_SIZE as u64 + i as u64;
            let off = block as usize * BLOCK_SIZE;
            let seq = g.next_seq;
            g.next_seq += 1;
            let before: Box<[u8]> = g.live[off..off + BLOCK_SIZE].into();
            let before_owner = g.owner.insert(block, (self.node, seq));
            g.live[off..off + BLOCK_SIZE].copy_from_slice(chunk);
            g.pending[self.node].push(Pending { block, seq, before, before_owner });
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut g = self.disk.inner.lock();
        if g.fenced[self.node] {
            return Err(fenced("flush", 0));
        }
        g.pending[self.node].clear();
        Ok(())
    }
}

/// Checks the disk's own rules on a tiny image, for every choice the crash makes.
pub fn self_test(rng: &mut SmallRng) {
    let blk = |v: u8| vec![v; BLOCK_SIZE];
    let bs = BLOCK_SIZE as u64;
    for _ in 0..32 {
        let disk = SharedDisk::new(vec![0u8; 4 * BLOCK_SIZE], 2);
        let (a, b) = (disk.view(0), disk.view(1));
        a.write_at(0, &blk(1)).unwrap();
        a.flush().unwrap();
        a.write_at(0, &blk(2)).unwrap();
        a.write_at(bs, &blk(3)).unwrap();
        b.write_at(bs, &blk(4)).unwrap();
        b.write_at(2 * bs, &blk(5)).unwrap();
        b.write_at(3 * bs, &blk(6)).unwrap();
        a.write_at(3 * bs, &blk(7)).unwrap();
        disk.crash(1, rng, false);
        let mut r = vec![0u8; BLOCK_SIZE];
        a.read_at(0, &mut r).unwrap();
        assert_eq!(r, blk(2), "a's pending write is untouched by b's crash");
        a.read_at(bs, &mut r).unwrap();
        assert!(r == blk(3) || r == blk(4), "a lost write of b puts back a's write before it");
        a.read_at(2 * bs, &mut r).unwrap();
        assert!(r == blk(0) || r == blk(5), "block 2 is zeros or b's write");
        a.read_at(3 * bs, &mut r).unwrap();
        assert_eq!(r, blk(7), "a's later write stands whatever b loses");
        assert!(b.write_at(0, &blk(9)).is_err(), "a crashed node writes nothing");
        disk.revive(1);
        b.write_at(0, &blk(9)).unwrap();
        b.flush().unwrap();
        disk.crash(1, rng, true);
        a.read_at(0, &mut r).unwrap();
        assert_eq!(r, blk(9), "a flushed write survives its node's crash");
    }
}
