//! What deploy/ ships, as far as one machine can try it: `mount -t concord` through the
//! `mount.concord` helper (an fstab line of a cluster mount, mounted with mount(8) and
//! unmounted with umount(8)), and the systemd units (`systemd-analyze verify`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use concord_tests::{can_mount, concord, concord_bin, detach, is_mounted, output_within, text, Cluster, Spec};

/// Where mount(8) looks for the helper of type `concord`.
const HELPER: &str = "/sbin/mount.concord";

/// /sbin/mount.concord → the `concord` binary under test, for the time of the test
/// (removed when dropped, if it is still ours).
struct HelperLink;

impl HelperLink {
    /// None (and the skip reported) when something else is there already.
    fn install(test: &str) -> Option<HelperLink> {
        let bin = concord_bin();
        match std::fs::read_link(HELPER) {
            Ok(t) if t == bin => return Some(HelperLink), // left by an earlier run of this test
            Ok(t) => {
                concord_journal::skip_test(test, &format!("{HELPER} exists already (-> {}); not ours", t.display()));
                return None;
            }
            Err(_) if Path::new(HELPER).exists() => {
                concord_journal::skip_test(test, &format!("{HELPER} exists already (installed?); not ours"));
                return None;
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&bin, HELPER).unwrap_or_else(|e| panic!("symlink {HELPER}: {e}"));
        Some(HelperLink)
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        if std::fs::read_link(HELPER).is_ok_and(|t| t == concord_bin()) {
            let _ = std::fs::remove_file(HELPER);
        }
    }
}

/// Process ids of the `concord mount` processes serving `mnt` (found in /proc: the
/// helper's mount runs in the background, no child of ours).
fn mount_pids(mnt: &Path) -> Vec<u32> {
    let want = mnt.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() > 2 && args[1] == b"mount" && args.contains(&want) {
            pids.push(pid);
        }
    }
    pids
}

/// Stops a background mount on `mnt` that the test did not unmount (on failure).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        for pid in mount_pids(&self.0) {
            // SAFETY: kill(2) with a pid read from /proc; at worst it is gone already.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let start = Instant::now();
        while !mount_pids(&self.0).is_empty() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in mount_pids(&self.0) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if is_mounted(&self.0) {
            detach(&self.0);
        }
    }
}

/// An fstab line of a cluster mount (`concord` type, `config=` and `node=`, the
/// options fstab and systemd add) mounts with mount(8) through /sbin/mount.concord:
/// quietly, in the background, serving files and `concord status`; umount(8) unmounts
/// it, its process ends having unmounted cleanly, and fsck finds nothing. A helper
/// call without `node=` is refused with the reason and mount(8)'s failure status.
#[test]
fn an_fstab_line_mounts_with_mount_8_and_umount_8_unmounts_it() {
    const T: &str = "an_fstab_line_mounts_with_mount_8_and_umount_8_unmounts_it";
    if !can_mount(T) {
        return;
    }
    if Command::new("mount").arg("--version").output().is_err() {
        concord_journal::skip_test(T, "no mount(8)");
        return;
    }
    let mut c = Cluster::new(T, Spec::nodes(1));
    c.start_lockds();
    let Some(_link) = HelperLink::install(T) else { return };
    let mnt = c.mnt(1);
    let log = c.dir().join("helper-mount.log");
    let fstab = c.dir().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# device  mount point  type  options  dump  pass\n{} {} concord \
             config={},node=1,log={},commit=1,_netdev,nofail,x-systemd.requires=concord-lockd@1.service 0 0\n",
            c.image.display(),
            mnt.display(),
            c.config.display(),
            log.display()
        ),
    )
    .unwrap();

    // Refused: a cluster option without the other, before anything is mounted.
    let mut bad = Command::new("mount");
    bad.args(["-t", "concord"]).arg(&c.image).arg(&mnt).arg("-o").arg(format!("config={}", c.config.display()));
    let o = output_within(&mut bad, Duration::from_secs(60), Some(&mnt));
    assert!(!o.status.success() && text(&o).contains("go together"), "{}", text(&o));
    assert!(!is_mounted(&mnt));

    let _guard = MountGuard(mnt.clone());
    let mut cmd = Command::new("mount");
    cmd.arg("-T").arg(&fstab).arg(&mnt);
    let o = output_within(&mut cmd, Duration::from_secs(120), Some(&mnt));
    assert!(o.status.success(), "mount -T fstab: {}\n{}", text(&o), std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(text(&o), "", "mount.concord says nothing when it succeeds");
    assert!(is_mounted(&mnt));
    let pids = mount_pids(&mnt);
    assert_eq!(pids.len(), 1, "one background mount process: {pids:?}");
    std::fs::write(mnt.join("through mount(8)"), b"fstab").unwrap();
    assert_eq!(std::fs::read(mnt.join("through mount(8)")).unwrap(), b"fstab");
    let st = concord(&["status", mnt.to_str().unwrap(), "--json"]);
    assert!(st.status.success(), "{}", text(&st));
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!((v["node"].as_u64(), v["state"].as_str()), (Some(1), Some("up")), "{v}");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.contains(&format!(" {} ", mnt.display()))).expect("in mountinfo");
    assert!(line.contains(" - fuse") && line.contains(c.image.to_str().unwrap()), "{line}");

    let o = output_within(Command::new("umount").arg(&mnt), Duration::from_secs(60), Some(&mnt));
    assert!(o.status.success(), "umount: {}", text(&o));
    let start = Instant::now();
    while !mount_pids(&mnt).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "the mount process did not end after umount");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(&mnt));
    let log = std::fs::read_to_string(&log).unwrap();
    // The mount's messages from before it was ready are in the log too.
    assert!(log.contains("mounted jid=0") && log.contains("unmounted cleanly"), "{log}");
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after the unmount:\n{out}");
}

/// The units in deploy/systemd pass `systemd-analyze verify` (unknown keys, bad
/// dependencies and commands that do not exist are all reported), instantiated for
/// node 1 with ExecStart pointing at the binary under test.
#[test]
fn the_systemd_units_verify() {
    const T: &str = "the_systemd_units_verify";
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        concord_journal::skip_test(T, "no systemd-analyze (package systemd)");
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for e in std::fs::read_dir(&units).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        if !name.ends_with(".service") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(text.contains("/usr/local/bin/concord"), "{name}: ExecStart is not /usr/local/bin/concord");
        std::fs::write(dir.path().join(&name), text.replace("/usr/local/bin/concord", concord_bin().to_str().unwrap()))
            .unwrap();
        names.push(dir.path().join(name.replace("@.", "@1.")));
    }
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    let o = Command::new("systemd-analyze").arg("verify").args(&names).output().unwrap();
    assert!(o.status.success() && text(&o).trim().is_empty(), "systemd-analyze verify {names:?}:\n{}", text(&o));
}
