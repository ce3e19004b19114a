//! The pjdfstest POSIX suite against a Concord mount, with ext4 on a loop device as the
//! reference: every test that passes on ext4 must pass on Concord, except the ones listed
//! (with reasons) in docs/CONFORMANCE.md and in `EXCEPTIONS` below.
//!
//! Needs root, /dev/fuse, losetup, mkfs.ext4, the `pjdfstest` binary (PATH, or
//! $PJDFSTEST, or /opt/pjdfstest/bin) and the users `nobody`/`tests`; .ci/run installs
//! them. Where something is missing the test prints `SKIP <name>: <reason>`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Tests that pass on ext4 and cannot pass through FUSE, with the reason.
const EXCEPTIONS: &[(&str, &str)] = &[(
    "link::link_count_max",
    "pathconf(_PC_LINK_MAX) is indeterminate on FUSE filesystems (glibc maps it from the \
     statfs type), so pjdfstest skips the test",
)];

const CONFIG: &str = r#"
[features]
posix_fallocate = {}
rename_ctime = {}
utime_now = {}
utimensat = {}

[settings]
# Above the kernel's coarse clock tick (a jiffy), which both ext4 and FUSE use for
# kernel-side time updates.
naptime = 0.02
allow_remount = false
expected_failures = []

[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
"#;

fn pjdfstest_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PJDFSTEST") {
        return Some(PathBuf::from(p));
    }
    let opt = PathBuf::from("/opt/pjdfstest/bin/pjdfstest");
    if opt.exists() {
        return Some(opt);
    }
    let found = Command::new("sh").args(["-c", "command -v pjdfstest"]).output().ok()?;
    let s = String::from_utf8_lossy(&found.stdout).trim().to_string();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs the suite in `dir`, returning test name → outcome (ok, FAILED, skipped).
fn run_suite(bin: &Path, cfg: &Path, dir: &Path) -> BTreeMap<String, String> {
    let out = Command::new(bin).arg("-c").arg(cfg).arg("-p").arg(dir).current_dir(dir).output().expect("run pjdfstest");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut res = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(name), Some(outcome), None) = (parts.next(), parts.next(), parts.next()) {
            if name.contains("::") && ["ok", "FAILED", "skipped"].contains(&outcome) {
                res.insert(name.to_string(), outcome.to_string());
            }
        }
    }
    assert!(res.len() > 100, "pjdfstest produced too few results:\n{text}");
    res
}

struct Guard {
    child: Option<Child>,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).stderr(Stdio::null()).status();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(l).stderr(Stdio::null()).status();
        }
    }
}

#[test]
fn pjdfstest_passes_everything_ext4_passes() {
    const NAME: &str = "pjdfstest_passes_everything_ext4_passes";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        concord_journal::skip_test(NAME, "needs root and /dev/fuse");
        return;
    }
    let Some(bin) = pjdfstest_bin() else {
        concord_journal::skip_test(NAME, "pjdfstest not installed (cargo install pjdfstest)");
        return;
    };
    if !ok(Command::new("id").arg("tests")) || !ok(Command::new("id").arg("nobody")) {
        concord_journal::skip_test(NAME, "users `tests` and `nobody` are needed");
        return;
    }
    if !ok(Command::new("mkfs.ext4").arg("-V")) || !ok(Command::new("losetup").arg("--version")) {
        concord_journal::skip_test(NAME, "mkfs.ext4 and losetup are needed for the reference run");
        return;
    }
    // A short directory, and mount points of equal length: pjdfstest binds unix sockets
    // below them, and a sockaddr_un path holds at most 107 bytes, so a deep checkout
    // would fail socket tests on one filesystem and not the other.
    let tmp = tempfile::Builder::new().prefix("pjd").tempdir_in("/tmp").unwrap();
    let cfg = tmp.path().join("pjdfstest.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let mut g = Guard { child: None, mounts: Vec::new(), loops: Vec::new() };

    // Reference: ext4 on a loop device.
    let eimg = tmp.path().join("ext4.img");
    std::fs::File::create(&eimg).unwrap().set_len(512 << 20).unwrap();
    assert!(ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&eimg)));
    let lo = Command::new("losetup").args(["-f", "--show"]).arg(&eimg).output().unwrap();
    let lo = String::from_utf8_lossy(&lo.stdout).trim().to_string();
    assert!(!lo.is_empty(), "losetup failed");
    g.loops.push(lo.clone());
    let emnt = tmp.path().join("e");
    std::fs::create_dir(&emnt).unwrap();
    assert!(ok(Command::new("mount").arg(&lo).arg(&emnt)), "mount ext4");
    g.mounts.push(emnt.clone());
    assert!(ok(Command::new("chmod").arg("0777").arg(&emnt)));
    let ext4 = run_suite(&bin, &cfg, &emnt);

    // Concord through FUSE.
    let cimg = tmp.path().join("concord.img");
    let o = Command::new(env!("CARGO_BIN_EXE_concord")).args(["mkfs", "--size", "512M"]).arg(&cimg).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmnt = tmp.path().join("c");
    std::fs::create_dir(&cmnt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .arg("mount")
        .arg(&cimg)
        .arg(&cmnt)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    g.child = Some(child);
    g.mounts.push(cmnt.clone());
    assert!(line.contains("mounted on"), "{line}");
    assert!(ok(Command::new("chmod").arg("0777").arg(&cmnt)));
    let concord = run_suite(&bin, &cfg, &cmnt);

    let mut regressions = Vec::new();
    for (name, outcome) in &ext4 {
        if outcome != "ok" || EXCEPTIONS.iter().any(|(n, _)| n == name) {
            continue;
        }
        let got = concord.get(name).map(String::as_str).unwrap_or("missing");
        if got != "ok" {
            regressions.push(format!("{name}: ext4 ok, concord {got}"));
        }
    }
    let passed = concord.values().filter(|o| *o == "ok").count();
    let e_passed = ext4.values().filter(|o| *o == "ok").count();
    eprintln!("pjdfstest: concord {passed} passed, ext4 {e_passed} passed, of {} tests", ext4.len());
    assert!(regressions.is_empty(), "tests that pass on ext4 but not on Concord:\n{}", regressions.join("\n"));
}
