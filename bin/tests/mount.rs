//! Real FUSE mounts of the `concord` binary: POSIX behaviour through the kernel, clean
//! unmount on SIGTERM, and crash safety under `kill -9`. These need root and /dev/fuse;
//! where they are missing each test prints `SKIP <name>: <reason>` and returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_concord")
}

fn concord(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run concord")
}

fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        concord_journal::skip_test(test, "needs root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        concord_journal::skip_test(test, "no /dev/fuse");
        return false;
    }
    true
}

/// A running `concord mount`; dropping it kills the process and detaches the mount.
struct Mounted {
    child: Option<Child>,
    mnt: PathBuf,
}

impl Mounted {
    fn start(img: &Path, mnt: &Path, opts: &[&str]) -> Mounted {
        let mut child = Command::new(bin())
            .arg("mount")
            .arg(img)
            .arg(mnt)
            .args(opts)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn concord mount");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        BufReader::new(out).read_line(&mut line).expect("read ready line");
        let m = Mounted { child: Some(child), mnt: mnt.to_path_buf() };
        assert!(line.contains("mounted on"), "mount did not get ready: {line:?}");
        m
    }

    /// Sends `sig` and waits for the process; returns its exit status code.
    fn stop(&mut self, sig: i32) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, sig) };
        let st = c.wait().expect("wait");
        if sig == libc::SIGKILL {
            detach(&self.mnt);
        }
        st.code()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach(&self.mnt);
    }
}

fn detach(mnt: &Path) {
    let _ = Command::new("umount").arg("-l").arg(mnt).stderr(Stdio::null()).status();
}

fn setup(name: &str, size: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = dir.path().join(format!("{name}.img"));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let o = concord(&["mkfs", "--size", size, img.to_str().unwrap()]);
    assert!(o.status.success(), "mkfs: {}", String::from_utf8_lossy(&o.stderr));
    (dir, img, mnt)
}

fn fsck_code(img: &Path) -> (i32, String) {
    let o = concord(&["fsck", "-n", img.to_str().unwrap()]);
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
}

fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k * 31 + i * 7) % 251) as u8).collect()
}

#[test]
fn posix_through_the_kernel_and_clean_unmount() {
    if !can_mount("posix_through_the_kernel_and_clean_unmount") {
        return;
    }
    let (dir, img, mnt) = setup("posix", "512M");
    let mut m = Mounted::start(&img, &mnt, &[]);
    // A second single-node mount of the same image would write it under the first: it
    // is refused, after waiting (1 s here) for the first to let go.
    let mnt2 = dir.path().join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let o = Command::new(bin())
        .args(["mount", img.to_str().unwrap(), mnt2.to_str().unwrap()])
        .env("CONCORD_CLAIM_WAIT_SECS", "1")
        .output()
        .expect("run concord mount");
    detach(&mnt2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("in use by another Concord process"), "second mount: {err}");
    // The mount names its type: fuse.concord (vendor/fuser/CONCORD-PATCHES.md, 3).
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mnt_s = mnt.to_str().unwrap();
    let line = mounts.lines().find(|l| l.split(' ').nth(1) == Some(mnt_s)).expect("the mount in /proc/self/mounts");
    assert_eq!(line.split(' ').nth(2), Some("fuse.concord"), "{line}");
    let p = |s: &str| mnt.join(s);
    std::fs::write(p("small"), b"hello").unwrap();
    let big = pattern(1, 3 << 20);
    std::fs::write(p("big"), &big).unwrap();
    assert_eq!(std::fs::read(p("big")).unwrap(), big);
    std::fs::create_dir_all(p("a/b/c")).unwrap();
    std::fs::rename(p("small"), p("a/b/c/moved")).unwrap();
    assert!(!p("small").exists());
    std::fs::hard_link(p("big"), p("a/big-link")).unwrap();
    assert_eq!(std::fs::metadata(p("big")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("a/b", p("ln")).unwrap();
    assert_eq!(std::fs::read_to_string(p("ln/c/moved")).unwrap(), "hello");
    std::fs::set_permissions(p("big"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(p("big")).unwrap().mode() & 0o7777, 0o600);
    let f = std::fs::OpenOptions::new().write(true).open(p("big")).unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(p("big")).unwrap().len(), 1000);
    let mut names: Vec<String> =
        std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["a", "big", "ln"]);
    assert_eq!(std::fs::remove_dir(p("a")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    // A 2,000-entry directory, listed back in full.
    std::fs::create_dir(p("many")).unwrap();
    for i in 0..2000 {
        std::fs::write(p(&format!("many/f{i}")), b"").unwrap();
    }
    assert_eq!(std::fs::read_dir(p("many")).unwrap().count(), 2000);
    assert_eq!(m.stop(libc::SIGTERM), Some(0), "SIGTERM must unmount cleanly");
    let j = concord(&["jinfo", img.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&j.stdout).contains(", clean,"), "{}", String::from_utf8_lossy(&j.stdout));
    let (code, out) = fsck_code(&img);
    assert_eq!(code, 0, "{out}");
    let _m = Mounted::start(&img, &mnt, &["-o", "ro"]);
    assert_eq!(std::fs::read(p("a/big-link")).unwrap(), &big[..1000]);
    assert_eq!(std::fs::read_dir(p("many")).unwrap().count(), 2000);
    assert_eq!(std::fs::write(p("nope"), b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));
}

#[test]
fn kill9_loses_nothing_fsynced() {
    if !can_mount("kill9_loses_nothing_fsynced") {
        return;
    }
    let (_dir, img, mnt) = setup("kill9", "512M");
    let mut m = Mounted::start(&img, &mnt, &[]);
    // An unlinked file held open at the crash: the next mount must free it.
    let orphan_path = mnt.join("orphan");
    std::fs::write(&orphan_path, pattern(9, 100_000)).unwrap();
    let mut orphan = std::fs::File::open(&orphan_path).unwrap();
    std::fs::remove_file(&orphan_path).unwrap();
    let mut head = [0u8; 4];
    orphan.read_exact(&mut head).unwrap();
    std::fs::File::open(&mnt).unwrap().sync_all().unwrap();

    let durable: Arc<Mutex<Vec<(PathBuf, Vec<u8>)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (durable, stop, mnt) = (durable.clone(), stop.clone(), mnt.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let dir = mnt.join(format!("d{}", i % 7));
                let _ = std::fs::create_dir(&dir);
                let path = dir.join(format!("f{i}"));
                let data = pattern(i, 1000 + (i * 7919) % 300_000);
                let r = (|| -> std::io::Result<()> {
                    let mut f = std::fs::File::create(&path)?;
                    f.write_all(&data)?;
                    if i % 3 == 0 {
                        f.sync_all()?;
                        durable.lock().unwrap().push((path.clone(), data.clone()));
                    }
                    Ok(())
                })();
                if r.is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(m.stop(libc::SIGKILL), None, "killed by a signal");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    drop(orphan);
    let durable = durable.lock().unwrap().clone();
    assert!(durable.len() > 5, "the workload fsynced too little to prove anything ({})", durable.len());

    let j = concord(&["jinfo", img.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&j.stdout).contains("dirty"), "journal should be dirty after kill -9");
    let mut m = Mounted::start(&img, &mnt, &[]);
    for (path, data) in &durable {
        let got = std::fs::read(path).unwrap_or_else(|e| panic!("{} lost after kill -9: {e}", path.display()));
        assert!(got == *data, "{} differs after kill -9", path.display());
    }
    assert_eq!(m.stop(libc::SIGTERM), Some(0));
    let (code, out) = fsck_code(&img);
    assert_eq!(code, 0, "fsck after replay: {out}");
    assert!(!out.contains("orphan") && !out.contains("nlinked"), "{out}");
}

/// `--daemon` returns once the mount is ready and leaves none of its caller's pipes open
/// (a caller reading its output to the end must not wait for the unmount); `--log`
/// receives the background mount's messages, here the one of its clean unmount.
#[test]
fn daemon_detaches_from_its_callers_output() {
    if !can_mount("daemon_detaches_from_its_callers_output") {
        return;
    }
    let (dir, img, mnt) = setup("daemon", "256M");
    let log = dir.path().join("mount.log");
    let bad =
        concord(&["mount", img.to_str().unwrap(), mnt.to_str().unwrap(), "--daemon", "--log", "/nonexistent/dir/log"]);
    assert!(!bad.status.success(), "a log that cannot be opened must be refused");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("log file"), "{}", String::from_utf8_lossy(&bad.stderr));
    // Not mounted by the refused command: the mountpoint is still the plain directory.
    assert!(!Command::new("mountpoint").arg("-q").arg(&mnt).status().map(|s| s.success()).unwrap_or(false));

    // Both pipes are read to their end by output(): it returns only when every holder
    // of them has closed them, so a background mount still holding one would hang here.
    // A watchdog detaches the mount to end the wait if that happens, and the test fails.
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, mnt) = (done.clone(), mnt.clone());
        std::thread::spawn(move || {
            for _ in 0..300 {
                if done.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            detach(&mnt);
            true
        })
    };
    let out = Command::new(bin())
        .args(["mount", img.to_str().unwrap(), mnt.to_str().unwrap(), "--daemon", "--log", log.to_str().unwrap()])
        .output()
        .expect("run concord mount --daemon");
    done.store(true, Ordering::Relaxed);
    let fired = watchdog.join().unwrap();
    assert!(!fired, "concord mount --daemon kept its caller's output open");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("mounted on"), "{text}");
    let pid: i32 = text
        .split("process ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process id in {text:?}"));
    // The mount works, and stops cleanly on SIGTERM, saying so in the log.
    std::fs::write(mnt.join("f"), b"data").unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"data");
    // SAFETY: kill(2) on the background mount this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut gone = false;
    for _ in 0..300 {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !gone {
        // SAFETY: as above; the test must not leave the mount running.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        detach(&mnt);
        panic!("the background mount did not stop on SIGTERM");
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("unmounted cleanly"), "log: {logged:?}");
    assert_eq!(fsck_code(&img).0, 0);
}
