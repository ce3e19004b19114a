//! Who may use Concord's local sockets: lockd's client socket and each cluster mount's
//! control socket.
//!
//! Both accept root (and the user the serving process runs as) by default, and the
//! members of one group when `[runtime] client_group` names it. Two checks, so that
//! neither alone decides:
//!
//! * **the socket file's mode**: 0600 without a group, 0660 and owned by the group with
//!   one ([`Access::secure_socket`]); a refused user usually fails already at
//!   `connect` (EACCES);
//! * **the peer's credentials**, read from the connected socket at accept
//!   ([`Peer::of`]: `SO_PEERCRED` for uid, gid and pid, `SO_PEERGROUPS` for the
//!   supplementary groups, both as the kernel recorded them at `connect`, so a process
//!   cannot change them afterwards): [`Access::check`]. A socket made more permissive
//!   by hand (`chmod 666`) therefore still lets nobody else in; the server tells a
//!   refused client why ([`Refusal`]) before closing.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// `SO_PEERGROUPS` (Linux 4.13), the same number on every architecture Concord builds
/// for (asm-generic, x86).
const SO_PEERGROUPS: libc::c_int = 59;

/// Most supplementary groups read of a peer (Linux allows 65536; a peer with more is
/// judged on its gid alone, which can only refuse it, never admit it wrongly).
const MAX_PEER_GROUPS: usize = 4096;

/// The credentials of the process at the other end of a unix socket, as the kernel
/// recorded them when it connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Process id (0 if the peer is in another pid namespace).
    pub pid: i32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// Reads the credentials of `sock`'s peer.
    pub fn of(sock: &impl AsFd) -> io::Result<Peer> {
        let fd = sock.as_fd().as_raw_fd();
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups = vec![0 as libc::gid_t; 64];
        loop {
            let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `groups`, which is that large.
            let r =
                unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len) };
            if r == 0 {
                groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
                break;
            }
            let e = io::Error::last_os_error();
            let want = len as usize / std::mem::size_of::<libc::gid_t>();
            if e.raw_os_error() == Some(libc::ERANGE) && want > groups.len() && want <= MAX_PEER_GROUPS {
                groups.resize(want, 0);
                continue;
            }
            // More groups than we read, or a kernel without SO_PEERGROUPS (before
            // 4.13): judged on its gid alone, which can refuse a member, never admit
            // a stranger.
            groups.clear();
            break;
        }
        Ok(Peer { uid: cred.uid, gid: cred.gid, pid: cred.pid, groups })
    }
}

/// A group whose members may use the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// As configured: a name, or a number.
    pub name: String,
    /// Its id.
    pub gid: u32,
}

/// Why [`Access::new`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    #[error("[runtime] client_group: no group named {0:?} on this machine (give a name from /etc/group or a number)")]
    NoSuchGroup(String),
    #[error("[runtime] client_group: looking up group {name:?}: {source}")]
    Lookup {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// A refused peer, and why (for the server's log and the client's error).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("uid {uid} is not root and not in {allowed}")]
pub struct Refusal {
    /// The peer's user id.
    pub uid: u32,
    /// Its process id.
    pub pid: i32,
    /// Who is let in, e.g. `group concord`, or `the client group (none is configured)`.
    pub allowed: String,
}

/// Who may use one socket: root, the process's own user, and the members of
/// [`Access::group`]. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    group: Option<Group>,
    /// The serving process's effective uid.
    owner: u32,
}

impl Access {
    /// Root (and this process's user) only, plus the members of `group` (a name or a
    /// number) if given, which must exist.
    pub fn new(group: Option<&str>) -> Result<Access, AccessError> {
        let group = group.map(resolve_group).transpose()?;
        // SAFETY: geteuid has no preconditions.
        let owner = unsafe { libc::geteuid() };
        Ok(Access { group, owner })
    }

    /// The configured group, if any.
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// Who may connect, for messages: `root and group concord only` or `root only (...)`.
    pub fn who(&self) -> String {
        describe(self.group.as_ref().map(|g| g.name.as_str()))
    }

    /// Admits root, this process's user, and members of the group (by the peer's gid or
    /// one of its supplementary groups).
    pub fn check(&self, peer: &Peer) -> Result<(), Refusal> {
        if peer.uid == 0 || peer.uid == self.owner {
            return Ok(());
        }
        if let Some(g) = &self.group {
            if peer.gid == g.gid || peer.groups.contains(&g.gid) {
                return Ok(());
            }
        }
        let allowed = match &self.group {
            Some(g) => format!("group {}", g.name),
            None => "the client group (none is configured: [runtime] client_group)".into(),
        };
        Err(Refusal { uid: peer.uid, pid: peer.pid, allowed })
    }

    /// Gives the socket file at `path` its mode: 0660 and the group when one is
    /// configured, 0600 otherwise.
    pub fn secure_socket(&self, path: &Path) -> io::Result<()> {
        match &self.group {
            Some(g) => {
                std::os::unix::fs::chown(path, None, Some(g.gid))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            }
            None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)),
        }
    }

    /// Whether the members of the group can pass through folder `dir` (search
    /// permission for others, or for the folder's group when it is ours); `None` when
    /// no group is configured or `dir` cannot be read.
    pub fn group_can_pass(&self, dir: &Path) -> Option<bool> {
        use std::os::unix::fs::MetadataExt;
        let g = self.group.as_ref()?;
        let m = std::fs::metadata(dir).ok()?;
        Some(m.mode() & 0o001 != 0 || (m.gid() == g.gid && m.mode() & 0o010 != 0))
    }
}

/// `root and group NAME only` or `root only (...)`: who may connect, for messages of
/// clients that know the configured group name (or its absence).
pub fn describe(group: Option<&str>) -> String {
    match group {
        Some(g) => format!("root and group {g} only"),
        None => "root only ([runtime] client_group is not set)".into(),
    }
}

fn resolve_group(name: &str) -> Result<Group, AccessError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Group { name: name.to_string(), gid });
    }
    let lookup = |source| AccessError::Lookup { name: name.to_string(), source };
    let cname = CString::new(name).map_err(|_| AccessError::NoSuchGroup(name.to_string()))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: an all-zero `group` is valid (null pointers, gid 0); getgrnam_r fills it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `cname` is NUL-terminated; `grp` and `buf` outlive the call, and `buf`
        // is as long as we say.
        let r = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) };
        if r == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(lookup(io::Error::from_raw_os_error(r)));
        }
        if found.is_null() {
            return Err(AccessError::NoSuchGroup(name.to_string()));
        }
        return Ok(Group { name: name.to_string(), gid: grp.gr_gid });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer { uid, gid, pid: 42, groups: groups.to_vec() }
    }

    #[test]
    fn root_and_the_group_are_let_in_by_gid_or_supplementary_group() {
        let a = Access { group: Some(Group { name: "concord".into(), gid: 4242 }), owner: 0 };
        assert!(a.check(&peer(0, 0, &[])).is_ok());
        assert!(a.check(&peer(1500, 4242, &[])).is_ok());
        assert!(a.check(&peer(1500, 1500, &[7, 4242])).is_ok());
        let e = a.check(&peer(1500, 1500, &[7])).unwrap_err();
        assert_eq!(e.to_string(), "uid 1500 is not root and not in group concord");
        let none = Access { group: None, owner: 0 };
        assert!(none.check(&peer(0, 0, &[])).is_ok());
        let e = none.check(&peer(1500, 0, &[0])).unwrap_err();
        assert!(e.to_string().starts_with("uid 1500 is not root and not in the client group (none"), "{e}");
        // The serving process's own user (a lockd run by hand as a user) is let in.
        assert!(Access { group: None, owner: 1500 }.check(&peer(1500, 1500, &[])).is_ok());
    }

    #[test]
    fn groups_resolve_by_number_or_name_and_unknown_names_are_errors() {
        assert_eq!(resolve_group("4242").unwrap().gid, 4242);
        assert_eq!(resolve_group("root").unwrap().gid, 0);
        assert!(matches!(resolve_group("no-such-group-here"), Err(AccessError::NoSuchGroup(_))));
    }

    #[test]
    fn a_socket_pair_reports_our_own_credentials() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Peer::of(&a).unwrap();
        // SAFETY: plain getters.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((p.uid, p.gid, p.pid), (uid, gid, std::process::id() as i32));
    }
}
