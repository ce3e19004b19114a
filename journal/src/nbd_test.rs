//! For tests against a real NBD server: [`QemuNbd`] serves an image file with
//! `qemu-nbd` on loopback and stops it when dropped. Shared by the tests of this
//! crate, of the `concord` binary and of the multi-node harness.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `qemu-nbd` process serving one image file; killed (and reaped) on drop.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub url: String,
    pub export: String,
    pub port: u16,
    pub image: PathBuf,
}

/// Whether `qemu-nbd` can be run; otherwise reports the skip of `test` with
/// [`crate::skip_test`] (a failure under CI, whose `.ci/run` installs qemu-utils).
pub fn have_qemu_nbd(test: &str) -> bool {
    match Command::new("qemu-nbd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => true,
        _ => {
            crate::skip_test(test, "qemu-nbd is missing (apt-get install qemu-utils)");
            false
        }
    }
}

impl QemuNbd {
    /// Serves `image` (raw) as export `export` to up to 8 clients at once, on a free
    /// loopback port; returns once the server accepts connections.
    ///
    /// `--cache=writeback` (qemu's default): one server process, so every client
    /// reads what any client wrote through the same page cache, and NBD_CMD_FLUSH is
    /// an fdatasync of the image. `--persistent` keeps it serving after a client
    /// leaves; `--shared=8` lets the nodes of a cluster connect at once (qemu-nbd then
    /// says NBD_FLAG_CAN_MULTI_CONN).
    pub fn start(image: &Path, export: &str) -> QemuNbd {
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            match spawn(image, export, port) {
                Ok(child) => {
                    return QemuNbd {
                        child,
                        url: format!("nbd://127.0.0.1:{port}/{export}"),
                        export: export.to_string(),
                        port,
                        image: image.to_path_buf(),
                    }
                }
                // A port taken meanwhile: try another.
                Err(e) => last = e,
            }
        }
        panic!("qemu-nbd did not start: {last}");
    }

    /// `kill -9` of the server, then the same server again on the same port (what
    /// its clients see as a server restart).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut last = String::new();
        for _ in 0..50 {
            match spawn(&self.image, &self.export, self.port) {
                Ok(child) => {
                    self.child = child;
                    return;
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("qemu-nbd did not start again on port {}: {last}", self.port);
    }
}

/// Starts qemu-nbd on `port` and waits until it accepts connections.
fn spawn(image: &Path, export: &str, port: u16) -> Result<Child, String> {
    let log = image.with_extension("qemu-nbd.log");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "--persistent", "--shared=8", "--cache=writeback", "-b", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-x", export])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn qemu-nbd: {e}"))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(st)) = child.try_wait() {
            let err = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("qemu-nbd exited with {st}: {err}"));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err("qemu-nbd did not listen within 20 s".into())
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
