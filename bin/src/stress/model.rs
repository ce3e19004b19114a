//! The model of one worker: what must be visible now, and what must survive a crash.
//!
//! The visible model is exact: every name of the worker (its private tree `w<N>/...`
//! and its names `shared/w<N>-<k>` in the shared directory) with its type; per file its
//! content (one write generation per 16-byte unit, 0 for zeros, so that the size is
//! `gens.len() * 16`), link count and `user.*` xattrs; per symlink its target.
//!
//! The durable model is what a crash of the worker's node must leave:
//!
//! - **Names** (and symlink targets, directories, xattrs): the state at the worker's
//!   last `fsync` of any file ([`Snapshot`]). Concord's fsync commits the node's whole
//!   journal, so the names and xattrs of that moment are on disk. A name changed after
//!   it (created, removed, renamed to or from, exchanged, linked) may be found in
//!   either state; every other name must be found as it was; a name the snapshot does
//!   not hold and nothing touched since must be absent. A file's xattrs are checked
//!   when none of them changed since. fdatasync is not a snapshot (it may only flush
//!   the device).
//! - **File content**: the content at the file's last `fsync` or `fdatasync`
//!   ([`FileObj::synced`]), exactly, if nothing changed the file since. If something
//!   did, the size must be one the file had since, and every unit either what it held
//!   at the sync, or data of this file at this offset from a later write (generation
//!   above [`FileObj::sync_gen`]), or zeros where a later truncate or punch could have
//!   zeroed it or beyond the synced size. A file is "synced" empty when created.
//!
//! Each worker checks only its own fsyncs: a sync of another worker of the same node
//! makes more durable, never less, so the check is conservative.

use std::collections::{BTreeMap, BTreeSet};

use super::pattern::{self, UNIT};

/// A model file id ([`pattern::file_id`]).
pub type Fid = u32;

/// What a name is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File(Fid),
    Dir,
    Symlink(String),
}

/// A file (an inode: all its names share it).
#[derive(Clone, Debug)]
pub struct FileObj {
    /// Write generation per 16-byte unit (0: zeros).
    pub gens: Vec<u32>,
    pub nlink: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The content at the last fsync or fdatasync of the file (empty when created).
    pub synced: Vec<u32>,
    /// The worker's generation at that sync: later writes have larger ones.
    pub sync_gen: u32,
    /// Whether anything changed the content or size since that sync.
    pub modified: bool,
    /// Whether a truncate or punch since that sync may have zeroed synced data.
    pub zeroed: bool,
    /// Every size (in units) the file had since that sync, that one included.
    pub sizes: BTreeSet<usize>,
}

impl FileObj {
    pub fn new(sync_gen: u32) -> FileObj {
        FileObj {
            gens: Vec::new(),
            nlink: 1,
            xattrs: BTreeMap::new(),
            synced: Vec::new(),
            sync_gen,
            modified: false,
            zeroed: false,
            sizes: BTreeSet::from([0]),
        }
    }

    pub fn size(&self) -> u64 {
        self.gens.len() as u64 * UNIT
    }

    /// Content synced: what it is now is what a crash must keep.
    pub fn sync(&mut self, gen: u32) {
        self.synced = self.gens.clone();
        self.sync_gen = gen;
        self.modified = false;
        self.zeroed = false;
        self.sizes = BTreeSet::from([self.gens.len()]);
    }

    fn changed(&mut self) {
        self.modified = true;
        self.sizes.insert(self.gens.len());
    }

    /// A write of `len` units at unit `at` with generation `gen`.
    pub fn write(&mut self, at: usize, len: usize, gen: u32) {
        if self.gens.len() < at + len {
            self.gens.resize(at + len, 0);
        }
        self.gens[at..at + len].fill(gen);
        self.changed();
    }

    /// A truncate to `units`.
    pub fn truncate(&mut self, units: usize) {
        if units < self.gens.len() {
            self.zeroed = true;
        }
        self.gens.resize(units, 0);
        self.changed();
    }

    /// A punched hole over units `at..at+len` (within the size; the size stays).
    pub fn punch(&mut self, at: usize, len: usize) {
        let end = (at + len).min(self.gens.len());
        if at < end {
            self.gens[at..end].fill(0);
        }
        self.zeroed = true;
        self.changed();
    }

    /// Whether what a crash left of the content (`data`) is allowed: see the module doc.
    /// The first problem, if any.
    pub fn durable_problem(&self, seed: u32, fid: Fid, data: &[u8]) -> Option<String> {
        let units = data.len() / UNIT as usize;
        if !data.len().is_multiple_of(UNIT as usize) {
            return Some(format!("size {} is no multiple of {UNIT}", data.len()));
        }
        if !self.modified {
            if units != self.synced.len() {
                return Some(format!(
                    "size: expected {} (as at its last sync), found {}",
                    self.synced.len() as u64 * UNIT,
                    data.len()
                ));
            }
            return pattern::first_difference(data, seed, fid, &self.synced).map(|(off, want, found)| {
                format!("at offset {off} (synced, unchanged since): expected {want}, found {found}")
            });
        }
        if !self.sizes.contains(&units) {
            let sizes: Vec<String> = self.sizes.iter().map(|u| (*u as u64 * UNIT).to_string()).collect();
            return Some(format!(
                "size: expected one of {} (since its last sync), found {}",
                sizes.join(", "),
                data.len()
            ));
        }
        for (i, chunk) in data.chunks(UNIT as usize).enumerate() {
            let at_sync = self.synced.get(i).copied().unwrap_or(0);
            let found = pattern::decode_for(chunk, seed);
            let ok = match found {
                pattern::Unit::Zero => at_sync == 0 || self.zeroed || i >= self.synced.len(),
                pattern::Unit::Data { seed: s, file, unit, gen } => {
                    s == seed && file == fid && unit as usize == i && (gen == at_sync || gen > self.sync_gen)
                }
                pattern::Unit::Garbage(_) => false,
            };
            if !ok {
                return Some(format!(
                    "at offset {}: expected {} (as at its last sync) or a later write of it, found {found}",
                    i as u64 * UNIT,
                    pattern::expected(seed, fid, i as u32, at_sync)
                ));
            }
        }
        None
    }
}

/// The names of a worker at its last fsync, and what changed since.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub names: BTreeMap<String, Node>,
    pub xattrs: BTreeMap<Fid, BTreeMap<String, Vec<u8>>>,
    /// Names created, removed or replaced since.
    pub touched: BTreeSet<String>,
    /// Files whose xattrs changed since.
    pub xattrs_touched: BTreeSet<Fid>,
}

/// One worker's model; see the module doc.
#[derive(Clone, Debug)]
pub struct Model {
    pub worker: u32,
    pub seed: u32,
    /// By path under the top directory: `w3`, `w3/f12`, `w3/d4/l7`, `shared/w3-9`.
    pub names: BTreeMap<String, Node>,
    pub files: BTreeMap<Fid, FileObj>,
    /// The worker's last write generation.
    pub gen: u32,
    /// The worker's last file number (for file ids) and name number (for names).
    pub next_file: u32,
    pub next_name: u32,
    pub durable: Snapshot,
    /// Increments of the shared counters this worker made.
    pub incs_flock: u64,
    pub incs_ofd: u64,
    /// The operations the worker has started (for the messages of later checks).
    pub ops: u64,
}

impl Model {
    pub fn new(worker: u32, seed: u32) -> Model {
        let mut m = Model {
            worker,
            seed,
            names: BTreeMap::new(),
            files: BTreeMap::new(),
            gen: 0,
            next_file: 0,
            next_name: 0,
            durable: Snapshot::default(),
            incs_flock: 0,
            incs_ofd: 0,
            ops: 0,
        };
        m.names.insert(m.root(), Node::Dir);
        m
    }

    /// The worker's private directory, under the top directory.
    pub fn root(&self) -> String {
        format!("w{}", self.worker)
    }

    /// The prefix of the worker's names in the shared directory.
    pub fn shared_prefix(&self) -> String {
        format!("w{}-", self.worker)
    }

    pub fn is_shared(key: &str) -> bool {
        key.starts_with("shared/")
    }

    /// A new name number.
    pub fn name_number(&mut self) -> u32 {
        self.next_name += 1;
        self.next_name
    }

    pub fn new_gen(&mut self) -> u32 {
        self.gen += 1;
        self.gen
    }

    pub fn new_fid(&mut self) -> Fid {
        self.next_file += 1;
        pattern::file_id(self.worker, self.next_file)
    }

    /// The directories of the private tree (the root first).
    pub fn dirs(&self) -> Vec<String> {
        self.names.iter().filter(|(k, n)| **n == Node::Dir && !Self::is_shared(k)).map(|(k, _)| k.clone()).collect()
    }

    /// The names of `dir` (a key), as (name, node).
    pub fn children(&self, dir: &str) -> Vec<(String, Node)> {
        let prefix = format!("{dir}/");
        self.names
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(k, n)| (k[prefix.len()..].to_string(), n.clone()))
            .collect()
    }

    /// The worker's names in the shared directory.
    pub fn shared_children(&self) -> Vec<(String, Node)> {
        self.children("shared")
    }

    /// Records that `key` changed (for the durable model).
    pub fn touch(&mut self, key: &str) {
        self.durable.touched.insert(key.to_string());
    }

    /// Adds a name: a new file (already in [`Model::files`] with one link), symlink or
    /// directory.
    pub fn add(&mut self, key: String, node: Node) {
        self.touch(&key);
        self.names.insert(key, node);
    }

    /// A hard link `key` to file `fid`.
    pub fn link(&mut self, key: String, fid: Fid) {
        if let Some(o) = self.files.get_mut(&fid) {
            o.nlink += 1;
        }
        self.add(key, Node::File(fid));
    }

    /// Removes a name; a file that loses its last name is gone.
    pub fn remove(&mut self, key: &str) -> Option<Node> {
        let node = self.names.remove(key)?;
        self.touch(key);
        if let Node::File(f) = &node {
            let gone = self.files.get_mut(f).map(|o| {
                o.nlink -= 1;
                o.nlink == 0
            });
            if gone == Some(true) {
                self.files.remove(f);
            }
        }
        Some(node)
    }

    /// rename(from, to): `to` replaced if it exists. Two names of one file: nothing
    /// changes (rename(2) does nothing then).
    pub fn rename(&mut self, from: &str, to: &str) {
        if let (Some(Node::File(a)), Some(Node::File(b))) = (self.names.get(from), self.names.get(to)) {
            if a == b {
                return;
            }
        }
        self.remove(to);
        let node = self.names.remove(from).expect("rename of a name the model holds");
        self.touch(from);
        self.touch(to);
        self.names.insert(to.to_string(), node);
    }

    /// renameat2(RENAME_EXCHANGE).
    pub fn exchange(&mut self, a: &str, b: &str) {
        let na = self.names.get(a).cloned().expect("exchange of a name the model holds");
        let nb = self.names.get(b).cloned().expect("exchange of a name the model holds");
        self.names.insert(a.to_string(), nb);
        self.names.insert(b.to_string(), na);
        self.touch(a);
        self.touch(b);
    }

    /// An fsync: the worker's names and xattrs as they are now are durable.
    pub fn snapshot(&mut self) {
        self.durable = Snapshot {
            names: self.names.clone(),
            xattrs: self.files.iter().map(|(f, o)| (*f, o.xattrs.clone())).collect(),
            touched: BTreeSet::new(),
            xattrs_touched: BTreeSet::new(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::pattern::{encode, fill};

    fn data(fid: Fid, gens: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; gens.len() * 16];
        for (i, g) in gens.iter().enumerate() {
            if *g != 0 {
                v[i * 16..i * 16 + 16].copy_from_slice(&encode(1, fid, i as u32, *g));
            }
        }
        v
    }

    #[test]
    fn a_synced_unchanged_file_must_be_exact() {
        let fid = pattern::file_id(0, 1);
        let mut f = FileObj::new(0);
        f.write(0, 4, 1);
        f.sync(1);
        assert_eq!(f.durable_problem(1, fid, &data(fid, &[1, 1, 1, 1])), None);
        assert!(f.durable_problem(1, fid, &data(fid, &[1, 1, 1])).unwrap().contains("size"));
        assert!(f.durable_problem(1, fid, &data(fid, &[1, 0, 1, 1])).unwrap().contains("offset 16"));
    }

    #[test]
    fn a_file_changed_after_its_sync_may_hold_either_state() {
        let fid = pattern::file_id(0, 1);
        let mut f = FileObj::new(0);
        f.write(0, 4, 1);
        f.sync(1);
        f.write(2, 4, 2);
        // The synced state, the new one, and a mix of the two are all allowed.
        for gens in [[1, 1, 1, 1, 0, 0].as_slice(), &[1, 1, 1, 1], &[1, 1, 2, 2, 2, 2], &[1, 1, 2, 1, 2, 0]] {
            assert_eq!(f.durable_problem(1, fid, &data(fid, gens)), None, "{gens:?}");
        }
        // Zeros where synced data was (nothing since could zero it), and a size it never had.
        assert!(f.durable_problem(1, fid, &data(fid, &[0, 1, 1, 1])).is_some());
        assert!(f.durable_problem(1, fid, &data(fid, &[1, 1, 1, 1, 2])).unwrap().contains("size"));
        // Vandalised bytes.
        let mut d = data(fid, &[1, 1, 1, 1]);
        fill(&mut d[16..32], 1, pattern::file_id(1, 1), 1, 1);
        assert!(f.durable_problem(1, fid, &d).unwrap().contains("file 1.1"));
    }

    #[test]
    fn renames_touch_both_names_and_a_replaced_file_loses_a_link() {
        let mut m = Model::new(0, 1);
        let a = m.new_fid();
        m.files.insert(a, FileObj::new(0));
        m.names.insert("w0/a".into(), Node::File(a));
        let b = m.new_fid();
        m.files.insert(b, FileObj::new(0));
        m.names.insert("w0/b".into(), Node::File(b));
        m.snapshot();
        m.rename("w0/a", "w0/b");
        assert_eq!(m.names.get("w0/b"), Some(&Node::File(a)));
        assert!(!m.files.contains_key(&b));
        assert!(m.durable.touched.contains("w0/a") && m.durable.touched.contains("w0/b"));
        assert_eq!(m.children("w0"), vec![("b".to_string(), Node::File(a))]);
    }
}
