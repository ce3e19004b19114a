//! Crash consistency of the journal against a model, over many seeds.
//!
//! Each seed runs random transactions (metadata copies, revokes, ordered data
//! written in place to freed blocks), group commits and checkpoints on a
//! `CrashDevice`, injects a device failure at a random point (`fail_after`),
//! cuts power with a random `CutMode`, replays (possibly crashing during the
//! replay too), and checks that the blocks in place equal the model's state
//! after some prefix of the batches: at least every batch whose commit
//! returned Ok, never a part of a batch. Then it checks that replay is
//! idempotent and that the journal can be opened and used again.
//!
//! `CONCORD_CRASH_SEEDS=N` runs N seeds (default 600);
//! `CONCORD_CRASH_DEBUG=1` prints every step;
//! `CONCORD_CRASH_SEED=S` runs only seed S.

use std::collections::BTreeMap;
use std::sync::Arc;

use concord_journal::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const REGION: LogRegion = LogRegion { start: 2, blocks: 256 };
const HOME_START: u64 = 300;
const HOME_BLOCKS: u64 = 80;
const DEV_BLOCKS: u64 = HOME_START + HOME_BLOCKS + 4;
const NONCE: u64 = 0x0123_4567_89AB_CDEF;

/// A block whose every 8 bytes hold `tag`, so a torn block is never mistaken
/// for a whole one.
fn pattern(tag: u64) -> Block {
    let mut b = [0u8; BLOCK_SIZE];
    for c in b.chunks_exact_mut(8) {
        c.copy_from_slice(&tag.to_le_bytes());
    }
    b
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Meta(u64),
    Revoke,
    Data(u64),
}

#[derive(Default)]
struct Model {
    /// Per home address, its events in order: (batch seq, event).
    events: BTreeMap<u64, Vec<(u64, Ev)>>,
    /// Highest seq whose commit (or checkpoint) returned Ok.
    acked: u64,
    /// Highest seq returned by add.
    added: u64,
}

impl Model {
    fn push(&mut self, addr: u64, seq: u64, ev: Ev) {
        self.events.entry(addr).or_default().push((seq, ev));
    }

    fn last(&self, addr: u64) -> Option<(u64, Ev)> {
        self.events.get(&addr).and_then(|v| v.last().copied())
    }

    /// Expected content after batches 1..=k: Some(tag), or None = anything (freed).
    fn expected(&self, addr: u64, k: u64) -> Option<u64> {
        let last = self.events.get(&addr).and_then(|v| v.iter().rev().find(|(s, _)| *s <= k).copied());
        match last {
            None => Some(0),
            Some((_, Ev::Meta(t))) | Some((_, Ev::Data(t))) => Some(t),
            Some((_, Ev::Revoke)) => None,
        }
    }

    /// A freed address (revoke committed, nothing since) the fs may now use for data.
    fn is_free(&self, addr: u64) -> bool {
        matches!(self.last(addr), Some((s, Ev::Revoke)) if s <= self.acked)
    }
}

fn home_tag(img: &[u8], addr: u64) -> Option<u64> {
    let off = addr as usize * BLOCK_SIZE;
    let b = &img[off..off + BLOCK_SIZE];
    let tag = u64::from_le_bytes(b[..8].try_into().unwrap());
    (b == &pattern(tag)[..]).then_some(tag)
}

fn matches_prefix(model: &Model, img: &[u8], k: u64) -> Result<(), String> {
    for addr in HOME_START..HOME_START + HOME_BLOCKS {
        if let Some(want) = model.expected(addr, k) {
            let got = home_tag(img, addr);
            if got != Some(want) {
                return Err(format!("block {addr}: want tag {want}, found {got:?}"));
            }
        }
    }
    Ok(())
}

fn random_mode(rng: &mut SmallRng) -> CutMode {
    match rng.gen_range(0..3) {
        0 => CutMode::DropAllUnflushed,
        1 => CutMode::RandomSubset,
        _ => CutMode::RandomSubsetTearLast,
    }
}

fn run_seed(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dev = CrashDevice::new(DEV_BLOCKS * BLOCK_SIZE as u64, seed ^ 0x5555);
    format(&dev, REGION, NONCE).unwrap();
    let shared: Arc<dyn BlockDevice> = Arc::new(dev.clone());
    let j = Journal::open(shared.clone(), REGION, NONCE, 0).unwrap();
    let mut model = Model::default();
    let mut next_tag = 1u64;
    let steps = rng.gen_range(1..80);
    let fail_at = if rng.gen_bool(0.8) { Some(rng.gen_range(0..steps)) } else { None };
    let mut dead = false;

    let debug = std::env::var("CONCORD_CRASH_DEBUG").is_ok();
    for step in 0..steps {
        if debug {
            eprintln!(
                "step {step} acked {} added {} stats {:?} dev {:?}",
                model.acked,
                model.added,
                j.stats(),
                dev.stats()
            );
        }
        if Some(step) == fail_at {
            dev.fail_after(rng.gen_range(1..12));
        }
        if dead {
            break;
        }
        match rng.gen_range(0..100) {
            0..=54 => {
                let mut tx = Transaction::new();
                // Half the transactions carry ordered data (two flushes per batch),
                // the others let their batch commit with one flush.
                tx.ordered = rng.gen_bool(0.5);
                let mut evs = Vec::new();
                for _ in 0..rng.gen_range(0..3) {
                    let a = HOME_START + rng.gen_range(0..HOME_BLOCKS);
                    tx.revoke(a);
                    evs.push((a, Ev::Revoke));
                }
                for _ in 0..rng.gen_range(0..9) {
                    let a = HOME_START + rng.gen_range(0..HOME_BLOCKS);
                    let tag = next_tag;
                    next_tag += 1;
                    tx.add_block(a, Arc::new(pattern(tag)));
                    evs.push((a, Ev::Meta(tag)));
                }
                // Ordered data: written in place to a freed block before the
                // transaction whose metadata references it is added.
                let mut data = None;
                if !tx.blocks.is_empty() && rng.gen_bool(0.3) {
                    let free: Vec<u64> = (HOME_START..HOME_START + HOME_BLOCKS)
                        .filter(|a| model.is_free(*a) && !evs.iter().any(|(e, _)| e == a))
                        .collect();
                    if !free.is_empty() {
                        let a = free[rng.gen_range(0..free.len())];
                        let tag = next_tag;
                        next_tag += 1;
                        if shared.write_at(a * BLOCK_SIZE as u64, &pattern(tag)).is_ok() {
                            data = Some((a, tag));
                        }
                    }
                }
                if debug {
                    eprintln!("add {:?} {:?}", tx.blocks.iter().map(|(a, _)| *a).collect::<Vec<_>>(), tx.revokes);
                }
                let seq = j.add(tx);
                if let Some((a, tag)) = data {
                    model.push(a, seq, Ev::Data(tag));
                }
                for (a, ev) in evs {
                    model.push(a, seq, ev);
                }
                model.added = model.added.max(seq);
                // An empty batch "commits" without using up its seq, so an add
                // after commit(seq) of an empty batch can land in batch seq again.
                if seq <= model.acked {
                    model.acked = seq - 1;
                }
            }
            55..=79 => {
                let target = if rng.gen_bool(0.3) { u64::MAX } else { rng.gen_range(model.acked..=model.added + 1) };
                let r = j.commit(target);
                if debug {
                    eprintln!("commit({target}) -> {r:?}");
                }
                match r {
                    Ok(()) => {
                        let done = if target == u64::MAX { model.added } else { target.min(model.added) };
                        model.acked = model.acked.max(done);
                    }
                    Err(_) => dead = true,
                }
            }
            80..=89 => match dbg_r(debug, "checkpoint", j.checkpoint()) {
                Ok(()) => model.acked = model.added,
                Err(_) => dead = true,
            },
            _ => {
                // The journal's view of a block matches the model.
                let a = HOME_START + rng.gen_range(0..HOME_BLOCKS);
                let mut b = [0u8; BLOCK_SIZE];
                if let Some((_, Ev::Meta(t))) = model.last(a) {
                    if !j.read_block(a, &mut b) && shared.read_at(a * BLOCK_SIZE as u64, &mut b).is_err() {
                        continue;
                    }
                    assert_eq!(b, pattern(t), "read_block({a}) at step {step}");
                } else {
                    assert!(!j.read_block(a, &mut b), "read_block({a}) of a freed or unlogged block");
                }
            }
        }
    }
    if !dead && rng.gen_bool(0.1) && j.shutdown().is_ok() {
        model.acked = model.added;
    }
    drop(j);

    dev.power_cut(random_mode(&mut rng));
    dev.restart();
    let plan = scan(&dev, REGION, NONCE).unwrap_or_else(|e| panic!("scan after crash: {e}"));

    // Maybe crash during replay as well, then scan again.
    let plan = if !plan.clean && rng.gen_bool(0.5) {
        dev.fail_after(rng.gen_range(1..plan.writes.len() as u64 + 4));
        let _ = apply(&dev, REGION, NONCE, &plan);
        dev.power_cut(random_mode(&mut rng));
        dev.restart();
        let again = scan(&dev, REGION, NONCE).unwrap_or_else(|e| panic!("scan after crash in replay: {e}"));
        assert!(again == plan || again.clean, "replay crash changed the plan");
        again
    } else {
        plan
    };
    apply(&dev, REGION, NONCE, &plan).unwrap();
    let img = dev.live_image();

    // Some prefix k >= acked of the batches is exactly in place.
    let ks: Vec<u64> = (model.acked..=model.added.max(model.acked)).collect();
    let results: Vec<Result<(), String>> = ks.iter().map(|k| matches_prefix(&model, &img, *k)).collect();
    if !results.iter().any(|r| r.is_ok()) {
        if std::env::var("CONCORD_CRASH_DEBUG").is_ok() {
            for (a, evs) in &model.events {
                eprintln!("{a}: {evs:?} home {:?}", home_tag(&img, *a));
            }
            eprintln!(
                "plan: clean {} head {} tail {} tx {} writes {:?}",
                plan.clean,
                plan.head_seq,
                plan.tail_seq,
                plan.transactions,
                plan.writes.iter().map(|(a, _)| *a).collect::<Vec<_>>()
            );
        }
        panic!(
            "no prefix of batches matches the device (acked {}, added {}); at k=acked: {}",
            model.acked,
            model.added,
            results[0].as_ref().unwrap_err()
        );
    }

    // Idempotent: the journal is clean now, and replaying again changes nothing.
    let after = scan(&dev, REGION, NONCE).unwrap();
    assert!(after.clean, "journal not clean after replay");
    apply(&dev, REGION, NONCE, &after).unwrap();
    apply(&dev, REGION, NONCE, &plan).unwrap();
    assert_eq!(dev.live_image(), img, "re-applying changed the device");

    // And the journal lives on.
    let j = Journal::open(shared.clone(), REGION, NONCE, 0).unwrap();
    let mut tx = Transaction::new();
    tx.add_block(HOME_START, Arc::new(pattern(u64::MAX)));
    let s = j.add(tx);
    j.commit(s).unwrap();
    j.shutdown().unwrap();
    assert!(scan(&dev, REGION, NONCE).unwrap().clean);
    assert_eq!(home_tag(&dev.live_image(), HOME_START), Some(u64::MAX));
}

#[test]
fn crash_anywhere_loses_nothing_committed_and_never_half_a_batch() {
    let seeds: Vec<u64> = match std::env::var("CONCORD_CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("CONCORD_CRASH_SEED")],
        Err(_) => {
            let n = std::env::var("CONCORD_CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
            (0..n).collect()
        }
    };
    for seed in seeds {
        if std::panic::catch_unwind(|| run_seed(seed)).is_err() {
            panic!("crash test failed for seed {seed}; rerun with CONCORD_CRASH_SEED={seed}");
        }
    }
}

fn dbg_r<T: std::fmt::Debug>(debug: bool, what: &str, r: T) -> T {
    if debug {
        eprintln!("{what} -> {r:?}");
    }
    r
}

/// Many threads commit concurrently (group commit) while the power is cut at
/// an arbitrary moment: whatever the interleaving, every tag a thread saw
/// acknowledged is in place after replay (or a newer one of that thread).
#[test]
fn power_cut_under_concurrent_group_commit() {
    const THREADS: u64 = 4;
    for seed in 0..20u64 {
        let dev = CrashDevice::new(DEV_BLOCKS * BLOCK_SIZE as u64, seed);
        format(&dev, REGION, NONCE).unwrap();
        let shared: Arc<dyn BlockDevice> = Arc::new(dev.clone());
        let j = Arc::new(Journal::open(shared, REGION, NONCE, 1).unwrap());
        // Thread t owns addresses HOME_START + t*8 .. +8 and writes tags
        // t*1_000_000 + n, n increasing.
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    let mut acked = BTreeMap::new();
                    for n in 1..10_000u64 {
                        let addr = HOME_START + t * 8 + n % 8;
                        let tag = t * 1_000_000 + n;
                        let mut tx = Transaction::new();
                        tx.add_block(addr, Arc::new(pattern(tag)));
                        let s = j.add(tx);
                        if j.commit(s).is_err() {
                            break;
                        }
                        acked.insert(addr, tag);
                    }
                    acked
                })
            })
            .collect();
        // Let them run for a number of device writes that depends on the seed.
        let target = 20 + seed * 7;
        while dev.stats().writes < target {
            std::thread::yield_now();
        }
        dev.power_cut(if seed % 2 == 0 { CutMode::RandomSubsetTearLast } else { CutMode::RandomSubset });
        let acked: Vec<BTreeMap<u64, u64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        dev.restart();
        let plan = scan(&dev, REGION, NONCE).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        apply(&dev, REGION, NONCE, &plan).unwrap();
        let img = dev.live_image();
        for (t, map) in acked.iter().enumerate() {
            for (addr, tag) in map {
                let got = home_tag(&img, *addr).unwrap_or_else(|| panic!("seed {seed}: block {addr} torn"));
                assert!(
                    got >= *tag && got / 1_000_000 == t as u64,
                    "seed {seed}: block {addr} holds {got}, acknowledged {tag}"
                );
            }
        }
    }
}
