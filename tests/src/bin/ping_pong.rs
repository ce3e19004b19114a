//! ping_pong: fcntl byte-range lock contention, as CTDB's `ping_pong` measures it.
//!
//! `ping_pong [-r] [-w] [-m] [--seconds S] FILE NUM_LOCKS`
//!
//! Run one copy per node (or several on one node), all on the same file, with
//! NUM_LOCKS one more than the number of copies. Each copy holds the lock on byte i
//! while it takes byte i+1, then drops byte i: the copies chase each other round a
//! ring, and every lock taken waits for the previous owner of that byte to let go.
//! `-r` reads the locked byte, `-w` increments it (so the copies check each other:
//! each copy counts the increments it saw others make), `-m` does both through a
//! shared mmap instead of pread/pwrite.
//!
//! Prints `locks/s N` once a second on stderr and, at the end, one line on stdout:
//! `ping_pong locks_per_s=N locks=M seconds=S [increments_seen=K]`.
//! Without `--seconds` it runs until killed.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

fn lock(fd: i32, byte: u64, typ: i32) -> std::io::Result<()> {
    // SAFETY: a zeroed flock is valid; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte as i64;
    fl.l_len = 1;
    loop {
        // SAFETY: fd is an open descriptor and fl a valid flock.
        let r = unsafe { libc::fcntl(fd, libc::F_SETLKW, &fl) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

struct Args {
    read: bool,
    write: bool,
    mmap: bool,
    seconds: Option<f64>,
    file: String,
    num_locks: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { read: false, write: false, mmap: false, seconds: None, file: String::new(), num_locks: 0 };
    let mut pos = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "-r" => a.read = true,
            "-w" => a.write = true,
            "-m" => a.mmap = true,
            "-rw" | "-wr" => {
                a.read = true;
                a.write = true
            }
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a value")?;
                a.seconds = Some(v.parse().map_err(|_| format!("bad --seconds {v}"))?);
            }
            _ if x.starts_with('-') => return Err(format!("unknown option {x}")),
            _ => pos.push(x),
        }
    }
    if pos.len() != 2 {
        return Err("usage: ping_pong [-r] [-w] [-m] [--seconds S] FILE NUM_LOCKS".into());
    }
    a.file = pos[0].clone();
    a.num_locks = pos[1].parse().map_err(|_| format!("bad NUM_LOCKS {}", pos[1]))?;
    if a.num_locks < 2 {
        return Err("NUM_LOCKS must be at least 2 (one more than the number of copies)".into());
    }
    Ok(a)
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ping_pong: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&a) {
        eprintln!("ping_pong: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> std::io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&a.file)?;
    let fd = f.as_raw_fd();
    if f.metadata()?.len() < a.num_locks {
        f.set_len(a.num_locks)?;
    }
    let map: *mut u8 = if a.mmap {
        // SAFETY: mapping a file we hold open, of at least num_locks bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                a.num_locks as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        p as *mut u8
    } else {
        std::ptr::null_mut()
    };
    let get = |i: u64| -> std::io::Result<u8> {
        if a.mmap {
            // SAFETY: i < num_locks, inside the mapping; the byte is under our lock.
            Ok(unsafe { std::ptr::read_volatile(map.add(i as usize)) })
        } else {
            let mut b = [0u8];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, i)?;
            Ok(b[0])
        }
    };
    let put = |i: u64, v: u8| -> std::io::Result<()> {
        if a.mmap {
            // SAFETY: as in get.
            unsafe { std::ptr::write_volatile(map.add(i as usize), v) };
            Ok(())
        } else {
            std::os::unix::fs::FileExt::write_all_at(&f, &[v], i)
        }
    };

    let n = a.num_locks;
    lock(fd, 0, libc::F_WRLCK)?;
    let mut i = 0u64;
    let mut last = vec![0u8; n as usize];
    let mut seen = 0u64;
    let mut count = 0u64;
    let start = Instant::now();
    let mut tick = Instant::now();
    let mut tick_count = 0u64;
    loop {
        let next = (i + 1) % n;
        lock(fd, next, libc::F_WRLCK)?;
        if a.read || a.write {
            let v = get(i)?;
            if a.write {
                // Every increment another copy made since we last held this byte.
                seen += u64::from(v.wrapping_sub(last[i as usize]));
                let w = v.wrapping_add(1);
                put(i, w)?;
                last[i as usize] = w;
            }
        }
        lock(fd, i, libc::F_UNLCK)?;
        i = next;
        count += 1;
        if tick.elapsed() >= Duration::from_secs(1) {
            let rate = (count - tick_count) as f64 / tick.elapsed().as_secs_f64();
            eprintln!("locks/s {rate:.0}");
            tick = Instant::now();
            tick_count = count;
        }
        if a.seconds.is_some_and(|s| start.elapsed().as_secs_f64() >= s) {
            break;
        }
    }
    lock(fd, i, libc::F_UNLCK)?;
    let secs = start.elapsed().as_secs_f64();
    let mut line = format!("ping_pong locks_per_s={:.0} locks={count} seconds={secs:.1}", count as f64 / secs);
    if a.write {
        // Our own increments are not counted: `seen` is what the others did.
        line.push_str(&format!(" increments_seen={seen}"));
    }
    println!("{line}");
    Ok(())
}
