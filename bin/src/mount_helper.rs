//! `mount.concord`: the `concord` binary run under that name (a symlink in /sbin) is
//! the helper mount(8) calls for `mount -t concord` and fstab lines of type `concord`:
//!
//! ```text
//! /sbin/mount.concord SPEC DIR [-sfnvrw] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]
//! ```
//!
//! It becomes `concord mount [--config FILE --node N] SPEC DIR -o OPTIONS --daemon`:
//! the mount runs in the background once ready and the helper exits 0 without a word
//! (mount(8) helpers are quiet unless `-v`); on failure the mount's error is on stderr
//! and the exit status is 32 (mount failure) or 1 (bad arguments), as mount(8) expects.
//!
//! Options (`-o`, comma separated):
//!
//! * `config=FILE,node=N`: a cluster mount as node N of the cluster FILE describes
//!   (both or neither; without them, a single-node mount);
//! * `log=FILE`: where the background mount writes its messages (default: nowhere);
//! * Concord's own mount options (`ro`, `rw`, `lockproto=`, `commit=`, `cache=`,
//!   `threads=`), passed on;
//! * options for mount(8), fstab and systemd, dropped: `defaults`, `auto`, `noauto`,
//!   `user`, `nouser`, `users`, `owner`, `group`, `user=...`, `_netdev`, `nofail`,
//!   `x-...`, `comment=...`, `helper=...`;
//! * flags Concord does not apply (`noatime`, `nosuid`, `nodev`, `noexec`, `sync`...):
//!   dropped with a warning (silently with `-s`).
//!
//! Anything else is an error, unless `-s` (sloppy) is given: then it is dropped with a
//! warning. `-f` checks the arguments and the configuration without mounting; `-n`
//! (do not write /etc/mtab) changes nothing (Concord never writes it); `-v` prints the
//! `concord mount` command run and its ready line; `-N` (another mount namespace) is
//! refused; `-r` and `-w` are `ro` and `rw`.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;

/// What mount(8) gave, sorted out.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Helper {
    pub spec: String,
    pub dir: String,
    pub config: Option<String>,
    pub node: Option<String>,
    pub log: Option<String>,
    /// Options for `concord mount -o`.
    pub options: Vec<String>,
    pub fake: bool,
    pub verbose: bool,
    /// Options dropped, to warn about.
    pub dropped: Vec<String>,
}

/// Concord's own `concord mount -o` options (their names).
const CONCORD_OPTIONS: [&str; 6] = ["ro", "rw", "lockproto", "commit", "cache", "threads"];

/// Options meant for mount(8), fstab or systemd: dropped without a word.
const FSTAB_ONLY: [&str; 10] =
    ["defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail"];

/// Options with a value meant for others: dropped without a word.
const FSTAB_ONLY_PREFIXES: [&str; 4] = ["x-", "comment=", "helper=", "user="];

/// VFS flags that a FUSE mount of Concord does not apply: dropped with a warning.
const VFS_FLAGS: [&str; 22] = [
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "sync",
    "async",
    "lazytime",
    "nolazytime",
    "dirsync",
    "mand",
    "nomand",
    "silent",
];

/// Sorts out mount(8)'s arguments (without the program name).
pub(crate) fn parse(args: &[String]) -> Result<Helper> {
    let mut h = Helper::default();
    let mut positional = Vec::new();
    let mut sloppy = false;
    let mut raw_options: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) {
            for (i, c) in flags.char_indices() {
                match c {
                    's' => sloppy = true,
                    'f' => h.fake = true,
                    'n' => {}
                    'v' => h.verbose = true,
                    'r' => raw_options.push("ro".into()),
                    'w' => raw_options.push("rw".into()),
                    'o' | 't' | 'N' => {
                        let rest = &flags[i + 1..];
                        let value = if rest.is_empty() {
                            it.next().cloned().ok_or_else(|| anyhow::anyhow!("-{c} needs a value"))?
                        } else {
                            rest.to_string()
                        };
                        match c {
                            'o' => raw_options.extend(value.split(',').filter(|o| !o.is_empty()).map(String::from)),
                            't' => {}
                            _ => bail!("-N {value}: mounting in another mount namespace is not supported"),
                        }
                        break;
                    }
                    other => bail!("unknown flag -{other} (mount.concord SPEC DIR [-sfnvrw] [-o OPTIONS])"),
                }
            }
        } else {
            positional.push(a.clone());
        }
    }
    let [spec, dir] = <[String; 2]>::try_from(positional)
        .map_err(|p| anyhow::anyhow!("expected a device and a mount point, got {p:?}"))?;
    h.spec = spec;
    h.dir = dir;
    for o in raw_options {
        let (name, value) = match o.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (o.as_str(), None),
        };
        match (name, value) {
            ("config", Some(v)) => h.config = Some(v.to_string()),
            ("node", Some(v)) => h.node = Some(v.to_string()),
            ("log", Some(v)) => h.log = Some(v.to_string()),
            _ if CONCORD_OPTIONS.contains(&name) => h.options.push(o.clone()),
            _ if value.is_none() && FSTAB_ONLY.contains(&name) => {}
            _ if FSTAB_ONLY_PREFIXES.iter().any(|p| o.starts_with(p)) => {}
            _ if value.is_none() && VFS_FLAGS.contains(&name) => {
                if !sloppy {
                    h.dropped.push(o.clone());
                }
            }
            _ if sloppy => h.dropped.push(o.clone()),
            _ => bail!(
                "unknown mount option {o:?} (known: config=FILE, node=N, log=FILE, ro, rw, lockproto=, \
                 commit=, cache=, threads=, and fstab's; -s drops unknown ones)"
            ),
        }
    }
    if h.config.is_some() != h.node.is_some() {
        bail!("config=FILE and node=N go together: a cluster mount needs both, a single-node mount neither");
    }
    Ok(h)
}

impl Helper {
    /// The `concord mount` arguments (without the program name) of this mount in the
    /// foreground.
    pub(crate) fn mount_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["mount".into()];
        if let (Some(c), Some(n)) = (&self.config, &self.node) {
            v.extend(["--config".into(), c.into(), "--node".into(), n.into()]);
        }
        v.extend([self.spec.clone().into(), self.dir.clone().into()]);
        if !self.options.is_empty() {
            v.extend(["-o".into(), self.options.join(",").into()]);
        }
        if let Some(l) = &self.log {
            v.extend(["--log".into(), l.into()]);
        }
        v
    }
}

/// mount(8)'s exit status for bad arguments.
const EXIT_USAGE: u8 = 1;
/// mount(8)'s exit status for a mount that failed.
const EXIT_MOUNT_FAILED: u8 = 32;

/// `mount.concord SPEC DIR ...` (see the module docs).
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let h = match parse(&args) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("mount.concord: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for o in &h.dropped {
        eprintln!("mount.concord: ignoring mount option {o:?} (Concord does not apply it)");
    }
    let again = h.mount_args();
    if h.verbose {
        let shown: Vec<String> = again.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        eprintln!("mount.concord: concord {} --daemon", shown.join(" "));
    }
    let mut full: Vec<OsString> = vec!["concord".into()];
    full.extend(again.iter().cloned());
    full.push("--daemon".into());
    let a = match crate::Cli::try_parse_from(&full) {
        Ok(crate::Cli { cmd: crate::Cmd::Mount(a) }) => a,
        Ok(_) => unreachable!("the arguments start with `mount`"),
        Err(e) => {
            eprintln!("mount.concord: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let how = crate::mount::How { quiet: !h.verbose, fake: h.fake };
    match crate::mount::run_with(a, &again, how) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount.concord: {e:#}");
            ExitCode::from(EXIT_MOUNT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn an_fstab_line_becomes_a_cluster_mount_and_drops_what_is_not_for_concord() {
        let h = parse(&args(
            "/dev/sdb /mnt/c -n -o rw,config=/etc/concord/cluster.toml,node=2,_netdev,nofail,noauto,defaults,\
             x-systemd.requires=concord-lockd@2.service,commit=2,log=/var/log/c.log,noatime",
        ))
        .unwrap();
        assert_eq!((h.spec.as_str(), h.dir.as_str()), ("/dev/sdb", "/mnt/c"));
        assert_eq!(h.config.as_deref(), Some("/etc/concord/cluster.toml"));
        assert_eq!(h.node.as_deref(), Some("2"));
        assert!(!h.fake && !h.verbose);
        assert_eq!(h.options, ["rw", "commit=2"]);
        assert_eq!(h.dropped, ["noatime"]);
        let shown: Vec<String> = h.mount_args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            shown,
            args(
                "mount --config /etc/concord/cluster.toml --node 2 /dev/sdb /mnt/c -o rw,commit=2 --log /var/log/c.log"
            )
        );
    }

    #[test]
    fn flags_single_node_mounts_and_refusals() {
        let h = parse(&args("img /m -sfv -oro,cache=0,whatever -t concord")).unwrap();
        assert!(h.fake && h.verbose && h.config.is_none());
        assert_eq!(h.options, ["ro", "cache=0"]);
        assert_eq!(h.dropped, ["whatever"]);
        let h = parse(&args("img /m -r")).unwrap();
        assert_eq!(h.options, ["ro"]);
        for (bad, why) in [
            ("img /m -o whatever", "unknown mount option"),
            ("img /m -o config=/c", "go together"),
            ("img /m -o node=1", "go together"),
            ("img /m -N /proc/1/ns/mnt", "namespace"),
            ("img", "expected a device and a mount point"),
            ("img /m extra", "expected a device and a mount point"),
            ("img /m -o", "needs a value"),
            ("img /m -q", "unknown flag"),
        ] {
            let e = parse(&args(bad)).map(|h| format!("accepted: {h:?}")).unwrap_or_else(|e| e.to_string());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
