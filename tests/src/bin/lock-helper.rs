//! A lock holder for tests/tests/cluster_locks.rs: a process that opens files and
//! takes flock(2) and fcntl(2) locks as told, one command per line on stdin, one
//! answer per line on stdout. SIGUSR1 interrupts a waiting lock (the handler is
//! installed without SA_RESTART, so the call returns EINTR).
//!
//! Commands (`SLOT` names an open file; answers `ok`, `err ERRNO`, or as said):
//!
//! * `open SLOT PATH`, `close SLOT`
//! * `flock SLOT ex|sh|un [nb]`
//! * `lk SLOT setlk|setlkw|ofd_setlk|ofd_setlkw r|w|u START LEN`
//! * `getlk SLOT getlk|ofd_getlk r|w START LEN`: `unlck` or `r|w START LEN PID`
//! * `count SLOT N pread|mmap`: N times: write-lock bytes 0..8 (F_SETLKW), add one to
//!   the little-endian u64 there, unlock (through a shared mapping: no msync, the
//!   unlock writes the range back)

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

extern "C" fn on_usr1(_: libc::c_int) {}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn answer(r: libc::c_int) -> String {
    if r == 0 {
        "ok".into()
    } else {
        format!("err {}", errno())
    }
}

fn flock_struct(typ: &str, start: &str, len: &str) -> libc::flock {
    // SAFETY: a plain C struct, all zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match typ {
        "r" => libc::F_RDLCK,
        "w" => libc::F_WRLCK,
        _ => libc::F_UNLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start.parse().expect("start");
    fl.l_len = len.parse().expect("len");
    fl
}

fn fcntl_cmd(name: &str) -> libc::c_int {
    match name {
        "setlk" => libc::F_SETLK,
        "setlkw" => libc::F_SETLKW,
        "getlk" => libc::F_GETLK,
        "ofd_setlk" => libc::F_OFD_SETLK,
        "ofd_setlkw" => libc::F_OFD_SETLKW,
        "ofd_getlk" => libc::F_OFD_GETLK,
        other => panic!("fcntl command {other}"),
    }
}

/// Locks bytes 0..8 of `fd` for writing (waiting), or unlocks them.
fn lock8(fd: i32, write: bool) {
    let mut fl = flock_struct(if write { "w" } else { "u" }, "0", "8");
    loop {
        // SAFETY: fcntl with a valid struct flock.
        let r = unsafe { libc::fcntl(fd, libc::F_SETLKW, &mut fl) };
        if r == 0 {
            return;
        }
        assert_eq!(errno(), libc::EINTR, "F_SETLKW: {}", std::io::Error::last_os_error());
    }
}

fn count(f: &std::fs::File, n: u64, mmap: bool) -> String {
    let fd = f.as_raw_fd();
    let map = if mmap {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new shared mapping of 4096 bytes of an open file (at least that long).
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, libc::MAP_SHARED, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Some(p.cast::<u8>())
    } else {
        None
    };
    for _ in 0..n {
        lock8(fd, true);
        match map {
            Some(p) => {
                // SAFETY: the mapping is 4096 bytes long and stays mapped; other
                // writers are kept out by the lock.
                unsafe {
                    let v = std::ptr::read_volatile(p.cast::<u64>());
                    std::ptr::write_volatile(p.cast::<u64>(), v + 1);
                }
            }
            None => {
                let mut b = [0u8; 8];
                f.read_exact_at(&mut b, 0).expect("pread");
                f.write_all_at(&(u64::from_le_bytes(b) + 1).to_le_bytes(), 0).expect("pwrite");
            }
        }
        lock8(fd, false);
    }
    if let Some(p) = map {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(p.cast(), 4096) };
    }
    "ok".into()
}

fn main() {
    // SAFETY: installing a handler that does nothing, without SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let mut files: HashMap<String, std::fs::File> = HashMap::new();
    let mut out = std::io::stdout();
    writeln!(out, "ready").unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let w: Vec<&str> = line.split_whitespace().collect();
        let fd = |slot: &str| files.get(slot).unwrap_or_else(|| panic!("slot {slot} not open")).as_raw_fd();
        let reply = match w.as_slice() {
            ["open", slot, path] => match std::fs::OpenOptions::new().read(true).write(true).open(path) {
                Ok(f) => {
                    files.insert(slot.to_string(), f);
                    "ok".into()
                }
                Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
            },
            ["close", slot] => {
                files.remove(*slot);
                "ok".into()
            }
            ["flock", slot, how, rest @ ..] => {
                let mut op = match *how {
                    "ex" => libc::LOCK_EX,
                    "sh" => libc::LOCK_SH,
                    _ => libc::LOCK_UN,
                };
                if rest == ["nb"] {
                    op |= libc::LOCK_NB;
                }
                // SAFETY: flock on an open descriptor.
                answer(unsafe { libc::flock(fd(slot), op) })
            }
            ["lk", slot, cmd, typ, start, len] => {
                let mut fl = flock_struct(typ, start, len);
                // SAFETY: fcntl with a valid struct flock.
                answer(unsafe { libc::fcntl(fd(slot), fcntl_cmd(cmd), &mut fl) })
            }
            ["getlk", slot, cmd, typ, start, len] => {
                let mut fl = flock_struct(typ, start, len);
                // SAFETY: fcntl with a valid struct flock.
                let r = unsafe { libc::fcntl(fd(slot), fcntl_cmd(cmd), &mut fl) };
                if r != 0 {
                    answer(r)
                } else if fl.l_type == libc::F_UNLCK as libc::c_short {
                    "unlck".into()
                } else {
                    let t = if fl.l_type == libc::F_WRLCK as libc::c_short { "w" } else { "r" };
                    format!("{t} {} {} {}", fl.l_start, fl.l_len, fl.l_pid)
                }
            }
            ["count", slot, n, how] => count(&files[*slot], n.parse().expect("n"), *how == "mmap"),
            _ => format!("bad command {line:?}"),
        };
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
}
