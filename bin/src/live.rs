//! Live views on a terminal: `concord top` (as GFS2's glocktop) and `concord cluster
//! status --watch`.
//!
//! [`live`] redraws a frame in place on the terminal's alternate screen every interval
//! and quits on `q` (or Ctrl-C, Ctrl-D), reading keys without waiting for Enter (the
//! terminal's canonical mode, echo and signal keys off while it runs, restored after).
//! When stdout or stdin is not a terminal, or with `--once`, it prints one frame.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::control;

#[derive(clap::Args)]
pub struct TopArgs {
    /// Cluster mounts on this machine (default: every cluster mount on this machine).
    mountpoints: Vec<PathBuf>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print one frame and exit (also when stdout is not a terminal).
    #[arg(long)]
    once: bool,
}

/// Redraws `frame()` every `interval` until the user quits (see the module docs).
pub fn live(interval: Duration, once: bool, mut frame: impl FnMut() -> String) -> Result<()> {
    let mut out = std::io::stdout();
    if once || !out.is_terminal() || !std::io::stdin().is_terminal() {
        crate::print_out(&frame())?;
        return Ok(());
    }
    let _raw = RawMode::enter()?;
    // Alternate screen, cursor hidden; both undone by RawMode's drop.
    out.write_all(b"\x1b[?1049h\x1b[?25l")?;
    loop {
        let (rows, cols) = term_size();
        let mut screen = String::from("\x1b[H\x1b[2J");
        for line in frame().lines().take(rows.saturating_sub(1)) {
            screen.extend(line.chars().take(cols));
            screen.push_str("\r\n");
        }
        out.write_all(screen.as_bytes())?;
        out.flush()?;
        let until = Instant::now() + interval;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if quit_key(left)? {
                return Ok(());
            }
        }
    }
}

/// Waits up to `timeout` for a key on stdin; whether it asks to quit.
fn quit_key(timeout: Duration) -> Result<bool> {
    let mut fds = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll(2) on one valid pollfd.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    if n <= 0 {
        return Ok(false);
    }
    let mut buf = [0u8; 64];
    let got = std::io::stdin().read(&mut buf)?;
    // End of input, q, Ctrl-C, Ctrl-D.
    Ok(got == 0 || buf[..got].iter().any(|b| matches!(b, b'q' | b'Q' | 3 | 4)))
}

/// (rows, columns) of the terminal on stdout; 24x80 if it does not say.
fn term_size() -> (usize, usize) {
    // SAFETY: an all-zero winsize is valid; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: ioctl TIOCGWINSZ with a pointer to a winsize.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        (usize::from(ws.ws_row), usize::from(ws.ws_col))
    } else {
        (24, 80)
    }
}

/// The terminal on stdin without canonical mode, echo and signal keys, until dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        // SAFETY: an all-zero termios is valid storage for tcgetattr to fill.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr on fd 0 with a valid termios pointer.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            bail!("reading the terminal's mode: {}", std::io::Error::last_os_error());
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: tcsetattr on fd 0 with a termios derived from the current one.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            bail!("setting the terminal's mode: {}", std::io::Error::last_os_error());
        }
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = std::io::stdout().write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        // SAFETY: restores the mode saved by `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

/// `HH:MM:SS` of a Unix time in milliseconds, in local time.
fn clock(unix_ms: u64) -> String {
    let t = (unix_ms / 1000) as libc::time_t;
    // SAFETY: an all-zero tm is valid storage; localtime_r fills it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r with valid pointers.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return "??:??:??".into();
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `concord top`.
pub fn top(a: TopArgs) -> Result<()> {
    if !(a.interval > 0.0 && a.interval <= 3600.0) {
        bail!("--interval must be more than 0 and at most 3600 seconds");
    }
    let sockets = || match a.mountpoints.is_empty() {
        false => a.mountpoints.iter().map(|m| control::socket_for(m)).collect(),
        true => control::all_sockets(),
    };
    for m in &a.mountpoints {
        // Refuse at once a mount point that is not a cluster mount.
        control::query(m, "status", true)?;
    }
    let mut top = Top::default();
    live(Duration::from_secs_f64(a.interval), a.once, || top.frame(&sockets()))
}

/// What `concord top` remembers between frames, to show rates.
#[derive(Default)]
struct Top {
    /// Per control socket: when it was last asked, its DLM requests then, and each
    /// glock's demotes asked then.
    last: HashMap<PathBuf, (Instant, u64, HashMap<String, u64>)>,
}

impl Top {
    fn frame(&mut self, sockets: &[PathBuf]) -> String {
        use std::fmt::Write;
        let mut mounts: Vec<(PathBuf, Value)> = Vec::new();
        let mut errors = Vec::new();
        for s in sockets {
            match control::ask(s, "top").and_then(|t| Ok(serde_json::from_str::<Value>(&t)?)) {
                Ok(v) => mounts.push((s.clone(), v)),
                // The socket of a mount that was killed: nobody listens any more.
                Err(e) if is_stale(&e) => {}
                Err(e) => errors.push(format!("{}: {e:#}", s.display())),
            }
        }
        mounts.sort_by_key(|(_, v)| v["node"].as_u64());
        let mut f = String::new();
        let _ = writeln!(
            f,
            "concord top: {} cluster mount(s) on this machine, {} (q quits)",
            mounts.len(),
            clock(now_unix_ms())
        );
        let _ = writeln!(f);
        let _ = writeln!(
            f,
            "{:<5} {:<11} {:>5} {:<9} {:>7} {:>9}  MOUNTPOINT",
            "NODE", "STATE", "GEN", "MEMBERS", "GLOCKS", "DLM REQ/S"
        );
        let now = Instant::now();
        let mut rates: HashMap<(u64, String), f64> = HashMap::new();
        let mut next = HashMap::new();
        for (sock, v) in &mounts {
            let node = v["node"].as_u64().unwrap_or(0);
            let reqs = v["dlm_requests"].as_u64().unwrap_or(0);
            let asked: HashMap<String, u64> = v["top"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| (g["glock"].as_str().unwrap_or("").to_string(), g["demotes_asked"].as_u64().unwrap_or(0)))
                .collect();
            let rate = match self.last.get(sock) {
                Some((t, r, prev)) => {
                    let secs = now.duration_since(*t).as_secs_f64().max(1e-3);
                    for (g, n) in &asked {
                        rates.insert((node, g.clone()), n.saturating_sub(*prev.get(g).unwrap_or(n)) as f64 / secs);
                    }
                    format!("{:.1}", reqs.saturating_sub(*r) as f64 / secs)
                }
                None => "-".to_string(),
            };
            next.insert(sock.clone(), (now, reqs, asked));
            let members: Vec<String> = v["members"].as_array().into_iter().flatten().map(|m| m.to_string()).collect();
            let _ = writeln!(
                f,
                "{:<5} {:<11} {:>5} {:<9} {:>7} {:>9}  {}",
                node,
                v["state"].as_str().unwrap_or("?"),
                v["generation"].as_u64().unwrap_or(0),
                members.join(","),
                v["glocks"].as_u64().unwrap_or(0),
                rate,
                v["mountpoint"].as_str().unwrap_or("?")
            );
        }
        self.last = next;
        for e in &errors {
            let _ = writeln!(f, "unreachable: {e}");
        }

        let mut recoveries: Vec<(u64, u64, &Value)> = mounts
            .iter()
            .flat_map(|(_, v)| {
                let node = v["node"].as_u64().unwrap_or(0);
                v["recoveries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |r| (r["at_unix_ms"].as_u64().unwrap_or(0), node, r))
            })
            .collect();
        recoveries.sort_by_key(|(at, node, _)| std::cmp::Reverse((*at, *node)));
        let _ = writeln!(f);
        let _ = writeln!(f, "JOURNAL RECOVERIES (newest first)");
        if recoveries.is_empty() {
            let _ = writeln!(f, "  none since these mounts started");
        }
        for (at, node, r) in recoveries.iter().take(8) {
            let _ = writeln!(
                f,
                "  {}  node {node} jid {}: {} in {} ms",
                clock(*at),
                r["jid"].as_u64().unwrap_or(0),
                r["outcome"].as_str().unwrap_or("?"),
                r["ms"].as_u64().unwrap_or(0)
            );
        }

        let glocks: Vec<(u64, &Value)> = mounts
            .iter()
            .flat_map(|(_, v)| {
                let node = v["node"].as_u64().unwrap_or(0);
                v["top"].as_array().into_iter().flatten().map(move |g| (node, g))
            })
            .collect();
        let header = format!(
            "{:<5} {:<22} {:<3} {:>7} {:>7} {:>9} {:>8} {:>8} {:>9}",
            "NODE", "GLOCK", "ST", "HOLDERS", "WAITERS", "WAITED", "ASKED", "ASKED/S", "DLM REQS"
        );
        let row = |node: u64, g: &Value| {
            let name = g["glock"].as_str().unwrap_or("?");
            format!(
                "{:<5} {:<22} {:<3} {:>7} {:>7} {:>7}ms {:>8} {:>8} {:>9}",
                node,
                name,
                g["state"].as_str().unwrap_or("?"),
                g["holders"].as_u64().unwrap_or(0),
                g["waiters"].as_u64().unwrap_or(0),
                g["wait_ms"].as_u64().unwrap_or(0),
                g["demotes_asked"].as_u64().unwrap_or(0),
                rates.get(&(node, name.to_string())).map_or("-".to_string(), |r| format!("{r:.1}")),
                g["dlm_requests"].as_u64().unwrap_or(0)
            )
        };
        let mut waits: Vec<&(u64, &Value)> = glocks.iter().filter(|(_, g)| g["waiters"].as_u64() > Some(0)).collect();
        waits.sort_by_key(|(_, g)| std::cmp::Reverse(g["wait_ms"].as_u64()));
        let _ = writeln!(f);
        let _ = writeln!(f, "LONGEST WAITS (holders queued on a glock)");
        let _ = writeln!(f, "{header}");
        if waits.is_empty() {
            let _ = writeln!(f, "  nobody waits");
        }
        for (node, g) in waits.iter().take(10) {
            let _ = writeln!(f, "{}", row(*node, g));
        }
        let mut asked: Vec<&(u64, &Value)> = glocks.iter().collect();
        asked.sort_by(|a, b| {
            let r = |(n, g): &&(u64, &Value)| {
                rates.get(&(*n, g["glock"].as_str().unwrap_or("").to_string())).copied().unwrap_or(0.0)
            };
            r(b).total_cmp(&r(a)).then(b.1["demotes_asked"].as_u64().cmp(&a.1["demotes_asked"].as_u64()))
        });
        let _ = writeln!(f);
        let _ = writeln!(f, "MOST DEMOTES (asked by other nodes; per second since the last refresh)");
        let _ = writeln!(f, "{header}");
        if asked.is_empty() {
            let _ = writeln!(f, "  no glock was asked for by another node");
        }
        for (node, g) in asked.iter().take(10) {
            let _ = writeln!(f, "{}", row(*node, g));
        }
        f
    }
}

/// Whether `e` says that no process listens on a control socket (left by a killed
/// mount, or gone meanwhile).
fn is_stale(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound))
}

/// For `concord cluster status --watch`: the frame with its quit hint.
pub fn watch(interval: Duration, mut text: impl FnMut() -> String) -> Result<()> {
    live(interval, false, || format!("{}\n(refreshed every {:.0?}; q quits)\n", text(), interval))
}
