//! Checks of what a mount shows against a worker's model: one file or listing as the
//! operations go, everything of a worker exactly ([`exact`], at the end of the run),
//! what a crash must have kept ([`durable`], after a kill, from a survivor), and the
//! model rebuilt from what is on disk ([`rebuild`]) so that the worker can go on.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::model::{Fid, FileObj, Model, Node};
use super::pattern::{self, UNIT};
use super::{sys, Fail};

/// A regular file, as the model has it: type, size, link count, content.
pub fn file(p: &Path, m: &Model, fid: Fid) -> Result<(), String> {
    let obj = m.files.get(&fid).ok_or("the model lost the file (a bug of concord stress)")?;
    let md = std::fs::symlink_metadata(p).map_err(|e| format!("lstat: unexpected error: {e}"))?;
    if !md.is_file() {
        return Err(format!("type: expected a file, found {}", kind(&md)));
    }
    if md.len() != obj.size() {
        return Err(format!("size: expected {}, found {}", obj.size(), md.len()));
    }
    if md.nlink() != u64::from(obj.nlink) {
        return Err(format!("link count: expected {}, found {}", obj.nlink, md.nlink()));
    }
    let data = std::fs::read(p).map_err(|e| format!("read: unexpected error: {e}"))?;
    content(&data, m.seed, fid, obj)
}

/// A file's content against the model.
fn content(data: &[u8], seed: u32, fid: Fid, obj: &FileObj) -> Result<(), String> {
    if data.len() as u64 != obj.size() {
        return Err(format!("read {} bytes; expected the size, {}", data.len(), obj.size()));
    }
    match pattern::first_difference(data, seed, fid, &obj.gens) {
        None => Ok(()),
        Some((off, want, found)) => Err(format!("at offset {off}: expected {want}, found {found}")),
    }
}

/// A symlink and its target.
pub fn symlink(p: &Path, target: &str) -> Result<(), String> {
    let found = std::fs::read_link(p).map_err(|e| format!("readlink: unexpected error: {e}"))?;
    if found.as_os_str() != target {
        return Err(format!("readlink: expected {target:?}, found {:?}", found.display()));
    }
    Ok(())
}

fn kind(md: &std::fs::Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_file() {
        "a file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symlink"
    } else {
        "something else"
    }
}

fn node_kind(n: &Node) -> &'static str {
    match n {
        Node::File(_) => "a file",
        Node::Dir => "a directory",
        Node::Symlink(_) => "a symlink",
    }
}

/// A directory's names (those starting with `prefix`, if given) and their types.
pub fn listing(p: &Path, want: &[(String, Node)], prefix: Option<&str>) -> Result<(), String> {
    let mut found = BTreeMap::new();
    for e in std::fs::read_dir(p).map_err(|e| format!("readdir: unexpected error: {e}"))? {
        let e = e.map_err(|e| format!("readdir: unexpected error: {e}"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if prefix.is_some_and(|pre| !name.starts_with(pre)) {
            continue;
        }
        let t = e.file_type().map_err(|e| format!("readdir: file type of {name}: {e}"))?;
        let k = if t.is_file() {
            "a file"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_symlink() {
            "a symlink"
        } else {
            "something else"
        };
        found.insert(name, k);
    }
    let want: BTreeMap<&str, &'static str> = want.iter().map(|(n, node)| (n.as_str(), node_kind(node))).collect();
    for (name, k) in &want {
        match found.get(*name) {
            None => return Err(format!("readdir: {name} ({k}) is missing")),
            Some(f) if f != k => return Err(format!("readdir: {name}: expected {k}, found {f}")),
            Some(_) => {}
        }
    }
    if let Some(extra) = found.keys().find(|n| !want.contains_key(n.as_str())) {
        return Err(format!("readdir: {extra} is there, but the model has no such name"));
    }
    Ok(())
}

/// What a scan found under a name.
#[derive(Debug)]
pub enum Found {
    File { ino: u64, nlink: u64, data: Vec<u8>, xattrs: BTreeMap<String, Vec<u8>> },
    Dir,
    Symlink(String),
    Other,
}

impl Found {
    fn kind(&self) -> &'static str {
        match self {
            Found::File { .. } => "a file",
            Found::Dir => "a directory",
            Found::Symlink(_) => "a symlink",
            Found::Other => "something else",
        }
    }
}

/// Everything of a worker on the mount whose top directory is `top`: its private tree
/// and its names in the shared directory, by model key.
pub fn scan(top: &Path, m: &Model) -> Result<BTreeMap<String, Found>, Fail> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![m.root()];
    out.insert(m.root(), Found::Dir);
    while let Some(dir) = dirs.pop() {
        scan_dir(top, &dir, None, &mut out, &mut dirs)?;
    }
    scan_dir(top, "shared", Some(&m.shared_prefix()), &mut out, &mut Vec::new())?;
    Ok(out)
}

fn scan_dir(
    top: &Path,
    dir: &str,
    prefix: Option<&str>,
    out: &mut BTreeMap<String, Found>,
    dirs: &mut Vec<String>,
) -> Result<(), Fail> {
    let dp = top.join(dir);
    let err = |p: &Path, call: &str, e: std::io::Error| Fail {
        path: p.to_path_buf(),
        what: format!("{call}: unexpected error: {e}"),
    };
    for e in std::fs::read_dir(&dp).map_err(|e| err(&dp, "readdir", e))? {
        let e = e.map_err(|e| err(&dp, "readdir", e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if prefix.is_some_and(|pre| !name.starts_with(pre)) {
            continue;
        }
        let key = format!("{dir}/{name}");
        let p = top.join(&key);
        let md = std::fs::symlink_metadata(&p).map_err(|e| err(&p, "lstat", e))?;
        let found = if md.is_file() {
            let data = std::fs::read(&p).map_err(|e| err(&p, "read", e))?;
            let mut xattrs = BTreeMap::new();
            for x in sys::list_xattrs(&p).map_err(|e| err(&p, "listxattr", e))? {
                if x.starts_with("user.") {
                    if let Some(v) = sys::get_xattr(&p, &x).map_err(|e| err(&p, "getxattr", e))? {
                        xattrs.insert(x, v);
                    }
                }
            }
            Found::File { ino: md.ino(), nlink: md.nlink(), data, xattrs }
        } else if md.is_dir() {
            dirs.push(key.clone());
            Found::Dir
        } else if md.file_type().is_symlink() {
            Found::Symlink(std::fs::read_link(&p).map_err(|e| err(&p, "readlink", e))?.to_string_lossy().into_owned())
        } else {
            Found::Other
        };
        out.insert(key, found);
    }
    Ok(())
}

fn show_xattrs(x: &BTreeMap<String, Vec<u8>>) -> String {
    let parts: Vec<String> = x.iter().map(|(k, v)| format!("{k}={:?}", String::from_utf8_lossy(v))).collect();
    format!("{{{}}}", parts.join(", "))
}

/// Everything of worker `m` on the mount whose top directory is `top`, exactly as the
/// model has it.
pub fn exact(top: &Path, m: &Model) -> Result<(), Fail> {
    let found = scan(top, m)?;
    let at = |key: &str, what: String| Fail { path: top.join(key), what };
    for (key, node) in &m.names {
        let Some(f) = found.get(key) else {
            return Err(at(key, format!("missing: expected {}", node_kind(node))));
        };
        match (node, f) {
            (Node::Dir, Found::Dir) => {}
            (Node::Symlink(t), Found::Symlink(ft)) if t == ft => {}
            (Node::Symlink(t), Found::Symlink(ft)) => {
                return Err(at(key, format!("readlink: expected {t:?}, found {ft:?}")));
            }
            (Node::File(fid), Found::File { nlink, data, xattrs, .. }) => {
                let obj = &m.files[fid];
                content(data, m.seed, *fid, obj).map_err(|w| at(key, w))?;
                if *nlink != u64::from(obj.nlink) {
                    return Err(at(key, format!("link count: expected {}, found {nlink}", obj.nlink)));
                }
                if *xattrs != obj.xattrs {
                    return Err(at(
                        key,
                        format!("xattrs: expected {}, found {}", show_xattrs(&obj.xattrs), show_xattrs(xattrs)),
                    ));
                }
            }
            (n, f) => return Err(at(key, format!("type: expected {}, found {}", node_kind(n), f.kind()))),
        }
    }
    if let Some(key) = found.keys().find(|k| !m.names.contains_key(*k)) {
        return Err(at(key, "there, but the model has no such name".to_string()));
    }
    Ok(())
}

/// What a crash of the worker's node must have kept (see [`super::model`]), on a
/// survivor's mount whose top directory is `top`.
pub fn durable(top: &Path, m: &Model) -> Result<(), Fail> {
    let found = scan(top, m)?;
    let s = &m.durable;
    let at = |key: &str, what: String| Fail { path: top.join(key), what: format!("durable: {what}") };
    for (key, node) in &s.names {
        if s.touched.contains(key) {
            continue;
        }
        let Some(f) = found.get(key) else {
            return Err(at(
                key,
                format!("missing: expected {} (there at the last fsync, unchanged since)", node_kind(node)),
            ));
        };
        match (node, f) {
            (Node::Dir, Found::Dir) => {}
            (Node::Symlink(t), Found::Symlink(ft)) if t == ft => {}
            (Node::Symlink(t), Found::Symlink(ft)) => {
                return Err(at(key, format!("readlink: expected {t:?}, found {ft:?}")));
            }
            (Node::File(fid), Found::File { data, xattrs, .. }) => {
                let Some(obj) = m.files.get(fid) else { continue };
                if let Some(p) = obj.durable_problem(m.seed, *fid, data) {
                    return Err(at(key, p));
                }
                if !s.xattrs_touched.contains(fid) {
                    let want = s.xattrs.get(fid).cloned().unwrap_or_default();
                    if *xattrs != want {
                        return Err(at(
                            key,
                            format!(
                                "xattrs: expected {} (as at the last fsync), found {}",
                                show_xattrs(&want),
                                show_xattrs(xattrs)
                            ),
                        ));
                    }
                }
            }
            (n, f) => return Err(at(key, format!("type: expected {}, found {}", node_kind(n), f.kind()))),
        }
    }
    if let Some(key) = found.keys().find(|k| !s.names.contains_key(*k) && !s.touched.contains(*k)) {
        return Err(at(key, "there, but it was not there at the last fsync and nothing made it since".to_string()));
    }
    Ok(())
}

/// The model of what is on the survivor's mount (whose top directory is `top`) after
/// a crash of the worker's node, once [`durable`] passed: names and contents as found,
/// all of it durable now (a survivor replayed the journal). Fails if the found state
/// is no state of this worker's files (data of another file or offset in one file,
/// link counts that do not match the names).
pub fn rebuild(top: &Path, m: &mut Model) -> Result<(), Fail> {
    let found = scan(top, m)?;
    let at = |key: &str, what: String| Fail { path: top.join(key), what: format!("rebuild: {what}") };
    let mut names = BTreeMap::new();
    let mut files: BTreeMap<Fid, FileObj> = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Fid> = BTreeMap::new();
    let mut links: BTreeMap<Fid, (u64, String)> = BTreeMap::new();
    for (key, f) in &found {
        let node = match f {
            Found::Dir => Node::Dir,
            Found::Symlink(t) => Node::Symlink(t.clone()),
            Found::Other => return Err(at(key, "neither file, directory nor symlink".to_string())),
            Found::File { ino, nlink, data, xattrs } => {
                if let Some(fid) = by_ino.get(ino) {
                    files.get_mut(fid).expect("an inode seen has its file").nlink += 1;
                    names.insert(key.clone(), Node::File(*fid));
                    continue;
                }
                let mut fid = None;
                let mut gens = Vec::with_capacity(data.len() / UNIT as usize);
                for (i, chunk) in data.chunks(UNIT as usize).enumerate() {
                    match pattern::decode_for(chunk, m.seed) {
                        pattern::Unit::Zero => gens.push(0),
                        pattern::Unit::Data { seed, file, unit, gen }
                            if seed == m.seed
                                && unit as usize == i
                                && (file >> 24) == m.worker + 1
                                && fid.is_none_or(|f| f == file) =>
                        {
                            fid = Some(file);
                            gens.push(gen);
                        }
                        other => {
                            return Err(at(
                                key,
                                format!("at offset {}: found {other}, no data of this file", i as u64 * UNIT),
                            ))
                        }
                    }
                }
                if !data.len().is_multiple_of(UNIT as usize) {
                    return Err(at(key, format!("size {} is no multiple of {UNIT}", data.len())));
                }
                let fid = match fid {
                    Some(f) if !files.contains_key(&f) => f,
                    Some(f) => {
                        return Err(at(
                            key,
                            format!("holds the data of file {}, as another file does", pattern::file_name(f)),
                        ))
                    }
                    None => m.new_fid(),
                };
                let mut obj = FileObj::new(m.gen);
                obj.gens = gens;
                obj.xattrs = xattrs.clone();
                obj.nlink = 1;
                obj.sync(m.gen);
                files.insert(fid, obj);
                by_ino.insert(*ino, fid);
                links.insert(fid, (*nlink, key.clone()));
                Node::File(fid)
            }
        };
        names.insert(key.clone(), node);
    }
    for (fid, (nlink, key)) in &links {
        if u64::from(files[fid].nlink) != *nlink {
            return Err(at(key, format!("link count {nlink}, but {} names of it were found", files[fid].nlink)));
        }
    }
    m.names = names;
    m.files = files;
    m.snapshot();
    Ok(())
}

/// The top directory on a mount.
pub fn top_on(mount: &Path, top: &str) -> PathBuf {
    mount.join(top)
}
