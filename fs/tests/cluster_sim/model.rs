//! The model: what the filesystem should hold, by real inode number, and the
//! operations the simulator runs, each with the outcome the model expects.

use std::collections::BTreeMap;

use concord_fs::format::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use concord_fs::{Filesystem, FsError, RenameFlags, SetAttr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir(BTreeMap<String, u64>),
    File(Vec<u8>),
    Link(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ino {
    pub kind: Kind,
    pub perm: u32,
    pub nlink: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    pub root: u64,
    pub inodes: BTreeMap<u64, Ino>,
}

/// One operation, by inode numbers and names.
#[derive(Clone, Debug)]
pub enum Op {
    Create {
        dir: u64,
        name: String,
    },
    Mkdir {
        dir: u64,
        name: String,
    },
    Symlink {
        dir: u64,
        name: String,
        target: String,
    },
    Link {
        ino: u64,
        dir: u64,
        name: String,
    },
    Unlink {
        dir: u64,
        name: String,
    },
    Rmdir {
        dir: u64,
        name: String,
    },
    Rename {
        d1: u64,
        n1: String,
        d2: u64,
        n2: String,
    },
    Write {
        ino: u64,
        off: u64,
        len: usize,
        tag: u64,
    },
    Truncate {
        ino: u64,
        size: u64,
    },
    Chmod {
        ino: u64,
        perm: u32,
    },
    Fsync,
    Read {
        ino: u64,
    },
    Stat {
        ino: u64,
    },
    Readdir {
        dir: u64,
    },
    Lookup {
        dir: u64,
        name: String,
    },
    /// An open handle on the running node (its iopen glock held shared until closed).
    Open {
        ino: u64,
    },
    /// The close of a handle the running node opened.
    Close {
        ino: u64,
    },
}

impl Op {
    /// Whether the operation can change the filesystem.
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::Fsync
                | Op::Read { .. }
                | Op::Stat { .. }
                | Op::Readdir { .. }
                | Op::Lookup { .. }
                | Op::Open { .. }
                | Op::Close { .. }
        )
    }
}

/// The bytes a write with `tag` puts at file offset `off` (they depend on the
/// offset, so that a block written at the wrong place shows).
pub fn payload(tag: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((tag.wrapping_mul(131) + (off + i) * 7 + (off + i) / 4096) % 251 + 1) as u8).collect()
}

/// What an operation returned, as far as the model predicts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A new inode (create, mkdir, symlink).
    New(u64),
    Err(&'static str),
}

pub fn err_kind(e: &FsError) -> &'static str {
    match e {
        FsError::NotFound | FsError::Stale(_) => "ENOENT",
        FsError::Exists(_) => "EEXIST",
        FsError::NotDir => "ENOTDIR",
        FsError::IsDir => "EISDIR",
        FsError::NotEmpty => "ENOTEMPTY",
        FsError::Invalid(_) => "EINVAL",
        _ => "EIO",
    }
}

impl Model {
    pub fn dir(&self, ino: u64) -> Option<&BTreeMap<String, u64>> {
        match self.inodes.get(&ino).map(|i| &i.kind) {
            Some(Kind::Dir(m)) => Some(m),
            _ => None,
        }
    }

    fn dir_mut(&mut self, ino: u64) -> &mut BTreeMap<String, u64> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.kind) {
            Some(Kind::Dir(m)) => m,
            // Operations name directories the model has (the generator picks them).
            _ => panic!("model: {ino} is not a directory"),
        }
    }

    pub fn parent_of(&self, ino: u64) -> Option<u64> {
        self.inodes.iter().find_map(|(p, i)| match &i.kind {
            Kind::Dir(m) if m.values().any(|c| *c == ino) => Some(*p),
            _ => None,
        })
    }

    /// Whether `a` is `b` or one of its ancestors.
    fn is_ancestor(&self, a: u64, mut b: u64) -> bool {
        for _ in 0..64 {
            if a == b {
                return true;
            }
            match self.parent_of(b) {
                Some(p) => b = p,
                None => return false,
            }
        }
        false
    }

    pub fn depth(&self, mut ino: u64) -> usize {
        let mut d = 0;
        while let Some(p) = self.parent_of(ino) {
            ino = p;
            d += 1;
        }
        d
    }

    fn drop_link(&mut self, ino: u64) {
        let i = self.inodes.get_mut(&ino).expect("model: a linked inode");
        i.nlink -= 1;
        if i.nlink == 0 {
            self.inodes.remove(&ino);
        }
    }

    /// Applies `op` as the filesystem should; `new` is the inode number the real
    /// filesystem gave a created inode (None: predict only).
    pub fn apply(&mut self, op: &Op, new: Option<u64>) -> Outcome {
        match op {
            Op::Create { dir, name } | Op::Mkdir { dir, name } | Op::Symlink { dir, name, .. } => {
                if self.dir(*dir).is_some_and(|d| d.contains_key(name)) {
                    return Outcome::Err("EEXIST");
                }
                let Some(ino) = new else { return Outcome::New(0) };
                let (kind, perm, nlink) = match op {
                    Op::Create { .. } => (Kind::File(Vec::new()), 0o644, 1),
                    Op::Mkdir { .. } => (Kind::Dir(BTreeMap::new()), 0o755, 2),
                    Op::Symlink { target, .. } => (Kind::Link(target.as_bytes().to_vec()), 0o777, 1),
                    _ => unreachable!(),
                };
                if matches!(op, Op::Mkdir { .. }) {
                    self.inodes.get_mut(dir).expect("model: parent").nlink += 1;
                }
                self.inodes.insert(ino, Ino { kind, perm, nlink });
                self.dir_mut(*dir).insert(name.clone(), ino);
                Outcome::New(ino)
            }
            Op::Link { ino, dir, name } => {
                if !self.inodes.contains_key(ino) {
                    return Outcome::Err("ENOENT");
                }
                if self.dir(*dir).is_some_and(|d| d.contains_key(name)) {
                    return Outcome::Err("EEXIST");
                }
                self.inodes.get_mut(ino).expect("checked").nlink += 1;
                self.dir_mut(*dir).insert(name.clone(), *ino);
                Outcome::Ok
            }
            Op::Unlink { dir, name } => {
                let Some(&ino) = self.dir(*dir).and_then(|d| d.get(name)) else { return Outcome::Err("ENOENT") };
                if self.dir(ino).is_some() {
                    return Outcome::Err("EISDIR");
                }
                self.dir_mut(*dir).remove(name);
                self.drop_link(ino);
                Outcome::Ok
            }
            Op::Rmdir { dir, name } => {
                let Some(&ino) = self.dir(*dir).and_then(|d| d.get(name)) else { return Outcome::Err("ENOENT") };
                let Some(d) = self.dir(ino) else { return Outcome::Err("ENOTDIR") };
                if !d.is_empty() {
                    return Outcome::Err("ENOTEMPTY");
                }
                self.dir_mut(*dir).remove(name);
                self.inodes.remove(&ino);
                self.inodes.get_mut(dir).expect("model: parent").nlink -= 1;
                Outcome::Ok
            }
            Op::Rename { d1, n1, d2, n2 } => {
                let Some(&src) = self.dir(*d1).and_then(|d| d.get(n1)) else { return Outcome::Err("ENOENT") };
                let dst = self.dir(*d2).and_then(|d| d.get(n2)).copied();
                if dst == Some(src) {
                    return Outcome::Ok;
                }
                let src_dir = self.dir(src).is_some();
                if src_dir && self.is_ancestor(src, *d2) {
                    return Outcome::Err("EINVAL");
                }
                if let Some(dst) = dst {
                    match (src_dir, self.dir(dst)) {
                        (true, None) => return Outcome::Err("ENOTDIR"),
                        (true, Some(m)) if !m.is_empty() => return Outcome::Err("ENOTEMPTY"),
                        (false, Some(_)) => return Outcome::Err("EISDIR"),
                        _ => {}
                    }
                    self.dir_mut(*d2).remove(n2);
                    if src_dir {
                        self.inodes.remove(&dst);
                        self.inodes.get_mut(d2).expect("model: parent").nlink -= 1;
                    } else {
                        self.drop_link(dst);
                    }
                }
                self.dir_mut(*d1).remove(n1);
                self.dir_mut(*d2).insert(n2.clone(), src);
                if src_dir {
                    self.inodes.get_mut(d1).expect("model: parent").nlink -= 1;
                    self.inodes.get_mut(d2).expect("model: parent").nlink += 1;
                }
                Outcome::Ok
            }
            Op::Write { ino, off, len, tag } => {
                let Some(Ino { kind: Kind::File(data), .. }) = self.inodes.get_mut(ino) else {
                    return Outcome::Err("ENOENT");
                };
                let end = *off as usize + len;
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[*off as usize..end].copy_from_slice(&payload(*tag, *off, *len));
                Outcome::Ok
            }
            Op::Truncate { ino, size } => {
                let Some(Ino { kind: Kind::File(data), .. }) = self.inodes.get_mut(ino) else {
                    return Outcome::Err("ENOENT");
                };
                data.resize(*size as usize, 0);
                Outcome::Ok
            }
            Op::Chmod { ino, perm } => {
                let Some(i) = self.inodes.get_mut(ino) else { return Outcome::Err("ENOENT") };
                i.perm = *perm;
                Outcome::Ok
            }
            Op::Open { ino } if !self.inodes.contains_key(ino) => Outcome::Err("ENOENT"),
            Op::Fsync
            | Op::Read { .. }
            | Op::Stat { .. }
            | Op::Readdir { .. }
            | Op::Lookup { .. }
            | Op::Open { .. }
            | Op::Close { .. } => Outcome::Ok,
        }
    }
}

/// Runs `op` on `fs`; reads are checked against `m` (the model before the op).
pub fn exec(fs: &Filesystem, op: &Op, m: &Model) -> Result<Outcome, String> {
    let done = |r: concord_fs::Result<()>| match r {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Err(err_kind(&e)),
    };
    let new = |r: concord_fs::Result<concord_fs::Attr>| match r {
        Ok(a) => Outcome::New(a.ino),
        Err(e) => Outcome::Err(err_kind(&e)),
    };
    Ok(match op {
        Op::Create { dir, name } => new(fs.create(*dir, name.as_bytes(), 0o644, 0, 0)),
        Op::Mkdir { dir, name } => new(fs.mkdir(*dir, name.as_bytes(), 0o755, 0, 0)),
        Op::Symlink { dir, name, target } => new(fs.symlink(*dir, name.as_bytes(), target.as_bytes(), 0, 0)),
        Op::Link { ino, dir, name } => done(fs.link(*ino, *dir, name.as_bytes()).map(|_| ())),
        Op::Unlink { dir, name } => done(fs.unlink(*dir, name.as_bytes())),
        Op::Rmdir { dir, name } => done(fs.rmdir(*dir, name.as_bytes())),
        Op::Rename { d1, n1, d2, n2 } => {
            done(fs.rename(*d1, n1.as_bytes(), *d2, n2.as_bytes(), RenameFlags::default()))
        }
        Op::Write { ino, off, len, tag } => done(fs.write(*ino, *off, &payload(*tag, *off, *len)).and_then(|n| {
            if n == *len {
                Ok(())
            } else {
                Err(FsError::Invalid(format!("short write {n}")))
            }
        })),
        Op::Truncate { ino, size } => {
            done(fs.setattr(*ino, &SetAttr { size: Some(*size), ..Default::default() }).map(|_| ()))
        }
        Op::Chmod { ino, perm } => {
            done(fs.setattr(*ino, &SetAttr { mode: Some(*perm), ..Default::default() }).map(|_| ()))
        }
        Op::Fsync => done(fs.fsync()),
        Op::Open { ino } => done(fs.open(*ino).map(|_| ())),
        Op::Close { ino } => done(fs.release(*ino)),
        Op::Read { ino } => {
            let want = match m.inodes.get(ino).map(|i| &i.kind) {
                Some(Kind::File(d)) => d,
                _ => return Err(format!("read of {ino}, not a file in the model")),
            };
            let got = fs.read(*ino, 0, want.len() + 4096).map_err(|e| format!("read {ino}: {e}"))?;
            if &got != want {
                return Err(format!("read {ino}: {}", data_diff(&got, want)));
            }
            Outcome::Ok
        }
        Op::Stat { ino } => {
            let want = m.inodes.get(ino).ok_or(format!("stat of {ino}, not in the model"))?;
            let a = fs.getattr(*ino).map_err(|e| format!("getattr {ino}: {e}"))?;
            let got = attr_ino(fs, &a, want)?;
            if &got != want {
                return Err(format!("stat {ino}: got {}, want {}", show_ino(&got), show_ino(want)));
            }
            Outcome::Ok
        }
        Op::Readdir { dir } => {
            let want = m.dir(*dir).ok_or(format!("readdir of {dir}, not a dir in the model"))?;
            let got = list(fs, *dir)?;
            if &got != want {
                return Err(format!("readdir {dir}: got {got:?}, want {want:?}"));
            }
            Outcome::Ok
        }
        Op::Lookup { dir, name } => {
            let want = m.dir(*dir).and_then(|d| d.get(name)).copied();
            let got = match fs.lookup(*dir, name.as_bytes()) {
                Ok(a) => Some(a.ino),
                Err(FsError::NotFound) => None,
                Err(e) => return Err(format!("lookup {dir}/{name}: {e}")),
            };
            if got != want {
                return Err(format!("lookup {dir}/{name}: got {got:?}, want {want:?}"));
            }
            Outcome::Ok
        }
    })
}

fn list(fs: &Filesystem, dir: u64) -> Result<BTreeMap<String, u64>, String> {
    let items = fs.readdir(dir, 0, 100_000).map_err(|e| format!("readdir {dir}: {e}"))?;
    Ok(items
        .into_iter()
        .filter(|i| i.name != b"." && i.name != b"..")
        .map(|i| (String::from_utf8_lossy(&i.name).into_owned(), i.ino))
        .collect())
}

/// The model's view of a real inode (a directory's entries are not read here).
fn attr_ino(fs: &Filesystem, a: &concord_fs::Attr, want: &Ino) -> Result<Ino, String> {
    let kind = match a.mode & S_IFMT {
        S_IFDIR => match &want.kind {
            Kind::Dir(m) => Kind::Dir(m.clone()),
            _ => Kind::Dir(BTreeMap::new()),
        },
        S_IFREG => Kind::File(match &want.kind {
            Kind::File(d) if d.len() as u64 == a.size => d.clone(),
            _ => vec![0xEE; a.size as usize],
        }),
        S_IFLNK => Kind::Link(fs.readlink(a.ino).map_err(|e| format!("readlink {}: {e}", a.ino))?),
        t => return Err(format!("inode {} has type {t:o}", a.ino)),
    };
    Ok(Ino { kind, perm: a.mode & 0o7777, nlink: a.nlink })
}

fn show_ino(i: &Ino) -> String {
    let k = match &i.kind {
        Kind::Dir(m) => format!("dir {} entries", m.len()),
        Kind::File(d) => format!("file {} bytes", d.len()),
        Kind::Link(t) => format!("symlink -> {}", String::from_utf8_lossy(t)),
    };
    format!("{k} perm {:o} nlink {}", i.perm, i.nlink)
}

pub fn data_diff(got: &[u8], want: &[u8]) -> String {
    if got.len() != want.len() {
        return format!("{} bytes, want {}", got.len(), want.len());
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    format!("first difference at byte {first} (got {}, want {})", got[first], want[first])
}

/// Everything the filesystem holds, read through `fs` from the root.
pub fn scan(fs: &Filesystem, root: u64) -> Result<Model, String> {
    let mut inodes = BTreeMap::new();
    let mut todo = vec![root];
    while let Some(ino) = todo.pop() {
        if inodes.contains_key(&ino) {
            continue;
        }
        let a = fs.getattr(ino).map_err(|e| format!("getattr {ino}: {e}"))?;
        let kind = match a.mode & S_IFMT {
            S_IFDIR => {
                let m = list(fs, ino)?;
                todo.extend(m.values().copied());
                Kind::Dir(m)
            }
            S_IFREG => Kind::File(fs.read(ino, 0, a.size as usize + 4096).map_err(|e| format!("read {ino}: {e}"))?),
            S_IFLNK => Kind::Link(fs.readlink(ino).map_err(|e| format!("readlink {ino}: {e}"))?),
            t => return Err(format!("inode {ino} has type {t:o}")),
        };
        inodes.insert(ino, Ino { kind, perm: a.mode & 0o7777, nlink: a.nlink });
    }
    Ok(Model { root, inodes })
}

/// The differences between two models, briefly.
pub fn diff(got: &Model, want: &Model) -> String {
    let mut out = Vec::new();
    for (ino, w) in &want.inodes {
        match got.inodes.get(ino) {
            None => out.push(format!("{ino} missing ({})", show_ino(w))),
            Some(g) if g != w => match (&g.kind, &w.kind) {
                (Kind::Dir(a), Kind::Dir(b)) if a != b => out.push(format!("dir {ino}: got {a:?}, want {b:?}")),
                (Kind::File(a), Kind::File(b)) if a != b => out.push(format!("file {ino}: {}", data_diff(a, b))),
                _ => out.push(format!("{ino}: got {}, want {}", show_ino(g), show_ino(w))),
            },
            _ => {}
        }
    }
    for (ino, g) in &got.inodes {
        if !want.inodes.contains_key(ino) {
            out.push(format!("{ino} unexpected ({})", show_ino(g)));
        }
    }
    out.truncate(12);
    out.join("; ")
}
