//! One worker: a seeded sequence of operations on its private tree, on its names in
//! the shared directory and on the shared counters, each checked against its model
//! ([`super::model`]) as it goes.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::model::{Fid, FileObj, Model, Node};
use super::pattern::{self, UNIT};
use super::{sys, verify, Ctx, Fail, Rng};

/// The largest file, in units (256 KiB).
const MAX_UNITS: usize = 16 << 10;
/// The most names of a private tree, and subdirectories of its root.
const MAX_NAMES: usize = 64;
const MAX_SUBDIRS: usize = 4;
/// The most names of a worker in the shared directory.
const MAX_SHARED: usize = 8;
/// How long a failed coherence check is retried to tell a late invalidation from a
/// stale state (the run fails either way).
const COHERENCE_RETRY: std::time::Duration = std::time::Duration::from_secs(3);
/// The xattr names used (`user.k0`..).
const XATTR_NAMES: u64 = 4;

/// The operations, with their weights in the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Write,
    Read,
    Fsync,
    Fdatasync,
    Truncate,
    Fallocate,
    Punch,
    Rename,
    Exchange,
    Link,
    Unlink,
    Mkdir,
    Rmdir,
    Symlink,
    Readlink,
    SetXattr,
    GetXattr,
    RemoveXattr,
    Readdir,
    SharedCreate,
    SharedRename,
    SharedUnlink,
    CounterFlock,
    CounterOfd,
}

const MIX: &[(Op, u32)] = &[
    (Op::Create, 8),
    (Op::Write, 20),
    (Op::Read, 10),
    (Op::Fsync, 3),
    (Op::Fdatasync, 3),
    (Op::Truncate, 4),
    (Op::Fallocate, 2),
    (Op::Punch, 3),
    (Op::Rename, 5),
    (Op::Exchange, 2),
    (Op::Link, 3),
    (Op::Unlink, 5),
    (Op::Mkdir, 2),
    (Op::Rmdir, 2),
    (Op::Symlink, 3),
    (Op::Readlink, 1),
    (Op::SetXattr, 3),
    (Op::GetXattr, 2),
    (Op::RemoveXattr, 2),
    (Op::Readdir, 3),
    (Op::SharedCreate, 3),
    (Op::SharedRename, 2),
    (Op::SharedUnlink, 2),
    (Op::CounterFlock, 2),
    (Op::CounterOfd, 2),
];

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Write => "write",
            Op::Read => "read",
            Op::Fsync => "fsync",
            Op::Fdatasync => "fdatasync",
            Op::Truncate => "truncate",
            Op::Fallocate => "fallocate",
            Op::Punch => "punch",
            Op::Rename => "rename",
            Op::Exchange => "exchange",
            Op::Link => "link",
            Op::Unlink => "unlink",
            Op::Mkdir => "mkdir",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Readlink => "readlink",
            Op::SetXattr => "setxattr",
            Op::GetXattr => "getxattr",
            Op::RemoveXattr => "removexattr",
            Op::Readdir => "readdir",
            Op::SharedCreate => "shared create",
            Op::SharedRename => "shared rename",
            Op::SharedUnlink => "shared unlink",
            Op::CounterFlock => "flock counter",
            Op::CounterOfd => "ofd counter",
        }
    }
}

/// How the kill loop stops a worker and lets it go on (see [`Ctl::pause`]).
#[derive(Default)]
pub struct Ctl {
    st: Mutex<CtlState>,
    cv: Condvar,
}

#[derive(Default)]
struct CtlState {
    pause: bool,
    paused: bool,
    done: bool,
}

impl Ctl {
    /// Asks the worker to stop after its current operation and waits until it has (or
    /// has ended).
    pub fn pause(&self) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.pause = true;
        while !st.paused && !st.done {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.pause = false;
        self.cv.notify_all();
    }

    /// Called by the worker between operations.
    fn pause_point(&self) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if st.pause {
            st.paused = true;
            self.cv.notify_all();
            while st.pause {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.paused = false;
        }
    }

    fn finish(&self) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.done = true;
        self.cv.notify_all();
    }
}

/// A worker's state that outlives its thread.
pub struct Worker {
    pub id: u32,
    /// Index of its mount point.
    pub node: usize,
    pub model: Arc<Mutex<Model>>,
    pub ctl: Arc<Ctl>,
    /// Operations done.
    pub ops: Arc<std::sync::atomic::AtomicU64>,
}

/// The worker's thread: operations until the run ends or one fails.
pub fn run(ctx: Arc<Ctx>, w: Arc<Worker>) {
    let mut rng = Rng::new(ctx.seed ^ (u64::from(w.id) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut opno: u64 = 0;
    loop {
        w.ctl.pause_point();
        if ctx.stop.load(Ordering::SeqCst) || Instant::now() >= ctx.deadline {
            break;
        }
        if ctx.ops_started.fetch_add(1, Ordering::SeqCst) >= ctx.ops_limit {
            break;
        }
        opno += 1;
        let mut m = w.model.lock().unwrap_or_else(|e| e.into_inner());
        m.ops = opno;
        let op = choose(&ctx, &m, &mut rng);
        let r = do_op(&ctx, w.node, &mut m, &mut rng, op);
        drop(m);
        if ctx.verbose {
            eprintln!("stress: worker {} op {opno} {}", w.id, op.name());
        }
        match r {
            Ok(()) => {
                w.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => {
                ctx.fail(format!(
                    "seed {} worker {} op {opno} ({}) {}: {}",
                    ctx.seed,
                    w.id,
                    op.name(),
                    f.path.display(),
                    f.what
                ));
                break;
            }
        }
    }
    w.ctl.finish();
}

/// The next operation: drawn from the mix, without what the filesystem refused and
/// the counters under `--no-locks`, and turned into one that makes a target when
/// there is none.
fn choose(ctx: &Ctx, m: &Model, rng: &mut Rng) -> Op {
    let disabled = ctx.disabled.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let allowed =
        |op: Op| !disabled.contains(op.name()) && (ctx.locks || !matches!(op, Op::CounterFlock | Op::CounterOfd));
    let total: u32 = MIX.iter().filter(|(op, _)| allowed(*op)).map(|(_, w)| w).sum();
    let mut r = rng.below(u64::from(total)) as u32;
    let mut op = Op::Read;
    for (o, wt) in MIX.iter().filter(|(o, _)| allowed(*o)) {
        if r < *wt {
            op = *o;
            break;
        }
        r -= wt;
    }
    let files = private_files(m).len();
    let names = private_names(m).len();
    let shared = m.shared_children().len();
    match op {
        Op::Write
        | Op::Read
        | Op::Fsync
        | Op::Fdatasync
        | Op::Truncate
        | Op::Fallocate
        | Op::Punch
        | Op::SetXattr
        | Op::GetXattr
        | Op::Link
            if files == 0 =>
        {
            Op::Create
        }
        Op::RemoveXattr if files == 0 => Op::Create,
        Op::Rename | Op::Unlink if names == 0 => Op::Create,
        Op::Exchange if names < 2 => Op::Create,
        Op::Create | Op::Link | Op::Symlink if names >= MAX_NAMES => Op::Unlink,
        Op::Readlink if !m.names.values().any(|n| matches!(n, Node::Symlink(_))) => Op::Symlink,
        Op::Mkdir if m.dirs().len() > MAX_SUBDIRS => Op::Rmdir,
        Op::Rmdir if m.dirs().len() == 1 => Op::Mkdir,
        Op::SharedRename | Op::SharedUnlink if shared == 0 => Op::SharedCreate,
        Op::SharedCreate if shared >= MAX_SHARED => Op::SharedUnlink,
        op => op,
    }
}

/// The private files: (key, fid).
fn private_files(m: &Model) -> Vec<(String, Fid)> {
    m.names
        .iter()
        .filter(|(k, _)| !Model::is_shared(k))
        .filter_map(|(k, n)| match n {
            Node::File(f) => Some((k.clone(), *f)),
            _ => None,
        })
        .collect()
}

/// The private names that are not directories (what rename, exchange and unlink take).
fn private_names(m: &Model) -> Vec<String> {
    m.names.iter().filter(|(k, n)| !Model::is_shared(k) && **n != Node::Dir).map(|(k, _)| k.clone()).collect()
}

fn fail(path: &Path, what: impl Into<String>) -> Fail {
    Fail { path: path.to_path_buf(), what: what.into() }
}

fn io_fail(path: &Path, call: &str, e: std::io::Error) -> Fail {
    fail(path, format!("{call}: unexpected error: {e}"))
}

/// A new name in one of the private directories.
fn new_private_name(m: &mut Model, rng: &mut Rng, prefix: char) -> String {
    let dirs = m.dirs();
    let dir = rng.pick(&dirs).clone();
    let n = m.name_number();
    format!("{dir}/{prefix}{n}")
}

/// A length in units: mostly small, sometimes up to 1024 (16 KiB).
fn length(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=5 => rng.range(1, 16) as usize,
        6..=8 => rng.range(17, 256) as usize,
        _ => rng.range(257, 1024) as usize,
    }
}

/// Where a write starts: mostly over or right after the current data.
fn offset(rng: &mut Rng, size: usize, len: usize) -> usize {
    if rng.below(100) < 85 {
        rng.range(0, size.min(MAX_UNITS - len) as u64) as usize
    } else {
        rng.range(0, (MAX_UNITS - len) as u64) as usize
    }
}

/// Writes `len` units of generation `gen` at unit `at` of file `fid` through `f`.
fn write_units(f: &File, seed: u32, fid: Fid, at: usize, len: usize, gen: u32) -> std::io::Result<()> {
    let mut buf = vec![0u8; len * UNIT as usize];
    pattern::fill(&mut buf, seed, fid, at as u32, gen);
    f.write_all_at(&buf, at as u64 * UNIT)
}

fn open_rw(p: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).open(p)
}

fn do_op(ctx: &Ctx, node: usize, m: &mut Model, rng: &mut Rng, op: Op) -> Result<(), Fail> {
    let seed = ctx.seed32;
    let path = |key: &str| ctx.path(node, key);
    match op {
        Op::Create => {
            let key = new_private_name(m, rng, 'f');
            create_file(ctx, node, m, rng, key)
        }
        Op::Write => {
            let (key, fid) = rng.pick(&private_files(m)).clone();
            let p = path(&key);
            let obj = &m.files[&fid];
            let len = length(rng);
            let at = offset(rng, obj.gens.len(), len);
            let gen = m.new_gen();
            let f = open_rw(&p).map_err(|e| io_fail(&p, "open", e))?;
            write_units(&f, seed, fid, at, len, gen).map_err(|e| io_fail(&p, "pwrite", e))?;
            m.files.get_mut(&fid).expect("a name's file is in the model").write(at, len, gen);
            Ok(())
        }
        Op::Read => {
            let (key, fid) = rng.pick(&private_files(m)).clone();
            let p = path(&key);
            verify::file(&p, m, fid).map_err(|what| fail(&p, what))
        }
        Op::Fsync | Op::Fdatasync => {
            let (key, fid) = rng.pick(&private_files(m)).clone();
            let p = path(&key);
            let f = File::open(&p).map_err(|e| io_fail(&p, "open", e))?;
            if op == Op::Fsync {
                f.sync_all().map_err(|e| io_fail(&p, "fsync", e))?;
            } else {
                f.sync_data().map_err(|e| io_fail(&p, "fdatasync", e))?;
            }
            let gen = m.gen;
            m.files.get_mut(&fid).expect("a name's file is in the model").sync(gen);
            if op == Op::Fsync {
                m.snapshot();
            }
            Ok(())
        }
        Op::Truncate => {
            let (key, fid) = rng.pick(&private_files(m)).clone();
            let p = path(&key);
            let size = m.files[&fid].gens.len();
            let units = if rng.below(2) == 0 {
                rng.range(0, size as u64) as usize
            } else {
                rng.range(size as u64, (size + 256).min(MAX_UNITS) as u64) as usize
            };
            let f = open_rw(&p).map_err(|e| io_fail(&p, "open", e))?;
            f.set_len(units as u64 * UNIT).map_err(|e| io_fail(&p, "ftruncate", e))?;
            m.files.get_mut(&fid).expect("a name's file is in the model").truncate(units);
            Ok(())
        }
        Op::Fallocate | Op::Punch => {
            let (key, fid) = rng.pick(&private_files(m)).clone();
            let p = path(&key);
            let size = m.files[&fid].gens.len();
            let len = rng.range(1, 256) as usize;
            let at = rng.range(0, (size + 64).min(MAX_UNITS - len) as u64) as usize;
            let keep = op == Op::Punch || rng.below(2) == 0;
            let mode = match op {
                Op::Punch => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                _ if keep => libc::FALLOC_FL_KEEP_SIZE,
                _ => 0,
            };
            let f = open_rw(&p).map_err(|e| io_fail(&p, "open", e))?;
            match sys::fallocate(&f, mode, at as u64 * UNIT, len as u64 * UNIT) {
                Ok(()) => {}
                Err(e) if sys::unsupported(&e) => {
                    ctx.disable(op.name());
                    return Ok(());
                }
                Err(e) => return Err(io_fail(&p, "fallocate", e)),
            }
            let obj = m.files.get_mut(&fid).expect("a name's file is in the model");
            if op == Op::Punch {
                obj.punch(at, len);
            } else if !keep && at + len > obj.gens.len() {
                obj.truncate(at + len);
            }
            Ok(())
        }
        Op::Rename => {
            let from = rng.pick(&private_names(m)).clone();
            let names = private_names(m);
            let to = if rng.below(2) == 0 || names.len() < 2 {
                new_private_name(m, rng, 'r')
            } else {
                let others: Vec<String> = names.into_iter().filter(|n| *n != from).collect();
                rng.pick(&others).clone()
            };
            std::fs::rename(path(&from), path(&to)).map_err(|e| io_fail(&path(&from), "rename", e))?;
            m.rename(&from, &to);
            Ok(())
        }
        Op::Exchange => {
            let names = private_names(m);
            let a = rng.pick(&names).clone();
            let others: Vec<String> = names.into_iter().filter(|n| *n != a).collect();
            let b = rng.pick(&others).clone();
            match sys::exchange(&path(&a), &path(&b)) {
                Ok(()) => {}
                Err(e) if sys::unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    ctx.disable(op.name());
                    return Ok(());
                }
                Err(e) => return Err(io_fail(&path(&a), "renameat2(RENAME_EXCHANGE)", e)),
            }
            m.exchange(&a, &b);
            Ok(())
        }
        Op::Link => {
            let (key, fid) = rng.pick(&private_files(m)).clone();
            let to = new_private_name(m, rng, 'l');
            std::fs::hard_link(path(&key), path(&to)).map_err(|e| io_fail(&path(&to), "link", e))?;
            m.link(to, fid);
            Ok(())
        }
        Op::Unlink => {
            let key = rng.pick(&private_names(m)).clone();
            std::fs::remove_file(path(&key)).map_err(|e| io_fail(&path(&key), "unlink", e))?;
            m.remove(&key);
            Ok(())
        }
        Op::Mkdir => {
            let n = m.name_number();
            let key = format!("{}/d{n}", m.root());
            std::fs::create_dir(path(&key)).map_err(|e| io_fail(&path(&key), "mkdir", e))?;
            m.add(key, Node::Dir);
            Ok(())
        }
        Op::Rmdir => {
            let root = m.root();
            let subdirs: Vec<String> = m.dirs().into_iter().filter(|d| *d != root).collect();
            let key = rng.pick(&subdirs).clone();
            let p = path(&key);
            // Mostly emptied first (directories come and go); else it must refuse.
            if rng.below(4) > 0 {
                for (name, _) in m.children(&key) {
                    let child = format!("{key}/{name}");
                    std::fs::remove_file(path(&child)).map_err(|e| io_fail(&path(&child), "unlink", e))?;
                    m.remove(&child);
                }
            }
            let empty = m.children(&key).is_empty();
            match (std::fs::remove_dir(&p), empty) {
                (Ok(()), true) => {
                    m.remove(&key);
                    Ok(())
                }
                (Ok(()), false) => Err(fail(&p, "rmdir of a directory that is not empty succeeded")),
                (Err(e), false) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
                (Err(e), _) => Err(io_fail(&p, "rmdir", e)),
            }
        }
        Op::Symlink => {
            let key = new_private_name(m, rng, 's');
            let n = m.next_name;
            let len = rng.range(1, 200) as usize;
            let target: String =
                format!("target-{n}-").chars().chain((0..len).map(|i| (b'a' + (i % 26) as u8) as char)).collect();
            let p = path(&key);
            std::os::unix::fs::symlink(&target, &p).map_err(|e| io_fail(&p, "symlink", e))?;
            m.add(key, Node::Symlink(target.clone()));
            verify::symlink(&p, &target).map_err(|what| fail(&p, what))
        }
        Op::Readlink => {
            let links: Vec<(String, String)> = m
                .names
                .iter()
                .filter_map(|(k, n)| match n {
                    Node::Symlink(t) => Some((k.clone(), t.clone())),
                    _ => None,
                })
                .collect();
            let (key, target) = rng.pick(&links).clone();
            let p = path(&key);
            verify::symlink(&p, &target).map_err(|what| fail(&p, what))
        }
        Op::SetXattr | Op::GetXattr | Op::RemoveXattr => {
            let (key, fid) = rng.pick(&private_files(m)).clone();
            let p = path(&key);
            let name = format!("user.k{}", rng.below(XATTR_NAMES));
            match op {
                Op::SetXattr => {
                    let gen = m.new_gen();
                    let reps = rng.range(1, 20) as usize;
                    let value = format!("v{gen}-{}.", pattern::file_name(fid)).repeat(reps).into_bytes();
                    sys::set_xattr(&p, &name, &value).map_err(|e| io_fail(&p, "setxattr", e))?;
                    m.files.get_mut(&fid).expect("a name's file is in the model").xattrs.insert(name, value);
                    m.durable.xattrs_touched.insert(fid);
                    Ok(())
                }
                Op::GetXattr => {
                    let want = m.files[&fid].xattrs.get(&name).cloned();
                    let found = sys::get_xattr(&p, &name).map_err(|e| io_fail(&p, "getxattr", e))?;
                    if found != want {
                        return Err(fail(
                            &p,
                            format!("xattr {name}: expected {}, found {}", show_value(&want), show_value(&found)),
                        ));
                    }
                    Ok(())
                }
                _ => {
                    let has = m.files[&fid].xattrs.contains_key(&name);
                    match (sys::remove_xattr(&p, &name), has) {
                        (Ok(()), true) => {
                            m.files.get_mut(&fid).expect("a name's file is in the model").xattrs.remove(&name);
                            m.durable.xattrs_touched.insert(fid);
                            Ok(())
                        }
                        (Err(e), false) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
                        (Ok(()), false) => Err(fail(&p, format!("removexattr {name}: succeeded, but it was not set"))),
                        (Err(e), _) => Err(io_fail(&p, &format!("removexattr {name}"), e)),
                    }
                }
            }
        }
        Op::Readdir => {
            let dirs = m.dirs();
            let key = rng.pick(&dirs).clone();
            let p = path(&key);
            verify::listing(&p, &m.children(&key), None).map_err(|what| fail(&p, what))
        }
        Op::SharedCreate => {
            let n = m.name_number();
            let key = format!("shared/{}{n}", m.shared_prefix());
            create_file(ctx, node, m, rng, key.clone())?;
            coherent(ctx, node, m, &[&key])
        }
        Op::SharedRename => {
            let shared: Vec<String> = m.shared_children().into_iter().map(|(n, _)| format!("shared/{n}")).collect();
            let from = rng.pick(&shared).clone();
            let to = if rng.below(3) > 0 || shared.len() < 2 {
                let n = m.name_number();
                format!("shared/{}{n}", m.shared_prefix())
            } else {
                let others: Vec<String> = shared.into_iter().filter(|n| *n != from).collect();
                rng.pick(&others).clone()
            };
            std::fs::rename(path(&from), path(&to)).map_err(|e| io_fail(&path(&from), "rename", e))?;
            m.rename(&from, &to);
            coherent(ctx, node, m, &[&from, &to])
        }
        Op::SharedUnlink => {
            let shared: Vec<String> = m.shared_children().into_iter().map(|(n, _)| format!("shared/{n}")).collect();
            let key = rng.pick(&shared).clone();
            std::fs::remove_file(path(&key)).map_err(|e| io_fail(&path(&key), "unlink", e))?;
            m.remove(&key);
            coherent(ctx, node, m, &[&key])
        }
        Op::CounterFlock | Op::CounterOfd => {
            let flock = op == Op::CounterFlock;
            let p = path(if flock { super::COUNTER_FLOCK } else { super::COUNTER_OFD });
            let f = open_rw(&p).map_err(|e| io_fail(&p, "open", e))?;
            let lock = |on: bool| if flock { sys::flock(&f, on) } else { sys::ofd_lock(&f, on) };
            lock(true).map_err(|e| io_fail(&p, if flock { "flock" } else { "F_OFD_SETLKW" }, e))?;
            let r = increment(&f, &p);
            let _ = lock(false);
            r?;
            if flock {
                m.incs_flock += 1;
            } else {
                m.incs_ofd += 1;
            }
            Ok(())
        }
    }
}

/// Creates file `key` (private or shared) with some data, or none.
fn create_file(ctx: &Ctx, node: usize, m: &mut Model, rng: &mut Rng, key: String) -> Result<(), Fail> {
    let p = ctx.path(node, &key);
    let f =
        OpenOptions::new().write(true).create_new(true).mode(0o644).open(&p).map_err(|e| io_fail(&p, "create", e))?;
    let fid = m.new_fid();
    let mut obj = FileObj::new(m.gen);
    if rng.below(3) > 0 {
        let len = length(rng);
        let gen = m.new_gen();
        write_units(&f, ctx.seed32, fid, 0, len, gen).map_err(|e| io_fail(&p, "write", e))?;
        obj.write(0, len, gen);
    }
    m.files.insert(fid, obj);
    m.add(key, Node::File(fid));
    Ok(())
}

/// Checks `keys` of the shared directory as the model has them from another live node
/// (coherence): a name the model holds is there with its content, another is gone.
fn coherent(ctx: &Ctx, node: usize, m: &Model, keys: &[&str]) -> Result<(), Fail> {
    let live = ctx.live.read().unwrap_or_else(|e| e.into_inner());
    let n = ctx.mounts.len();
    let other = (1..n).map(|d| (node + d) % n).find(|&o| live[o]).unwrap_or(node);
    for key in keys {
        let p = ctx.path(other, key);
        let check = || match m.names.get(*key) {
            Some(Node::File(fid)) => verify::file(&p, m, *fid),
            Some(_) => Ok(()),
            None => match std::fs::symlink_metadata(&p) {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("lstat: unexpected error: {e}")),
                Ok(_) => Err(format!("exists, but it was removed through {}", ctx.mounts[node].display())),
            },
        };
        if let Err(what) = check() {
            // How long it lasts: a late invalidation (within --coherence-grace-ms it
            // is only counted), or a stale state for good.
            let t0 = Instant::now();
            let limit = COHERENCE_RETRY.max(ctx.grace);
            let later = loop {
                std::thread::sleep(std::time::Duration::from_millis(5));
                if check().is_ok() {
                    break Some(t0.elapsed());
                }
                if t0.elapsed() > limit {
                    break None;
                }
            };
            match later {
                Some(t) if t <= ctx.grace => ctx.late(t),
                Some(t) => {
                    return Err(fail(
                        &p,
                        format!(
                            "coherence (seen from {}): {what} (right {} ms later)",
                            ctx.mounts[other].display(),
                            t.as_millis()
                        ),
                    ))
                }
                None => {
                    return Err(fail(
                        &p,
                        format!(
                            "coherence (seen from {}): {what} (still wrong {} s later)",
                            ctx.mounts[other].display(),
                            limit.as_secs()
                        ),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// Read-modify-write of a counter file (held locked by the caller), made durable
/// before the lock goes.
fn increment(f: &File, p: &Path) -> Result<(), Fail> {
    let n = read_counter(f).map_err(|what| fail(p, what))?;
    f.write_all_at(format!("{}\n", n + 1).as_bytes(), 0).map_err(|e| io_fail(p, "pwrite", e))?;
    f.sync_all().map_err(|e| io_fail(p, "fsync", e))
}

/// The value of a counter file (empty: 0).
pub fn read_counter(mut f: &File) -> Result<u64, String> {
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(|e| format!("read: unexpected error: {e}"))?;
    let t = s.trim();
    if t.is_empty() {
        return Ok(0);
    }
    t.parse().map_err(|_| format!("the counter holds {s:?}, not a number"))
}

fn show_value(v: &Option<Vec<u8>>) -> String {
    match v {
        None => "none".to_string(),
        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
    }
}

/// Where `key` is on mount `node`.
pub fn key_path(mount: &Path, top: &str, key: &str) -> PathBuf {
    mount.join(top).join(key)
}
