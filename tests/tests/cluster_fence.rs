//! A node whose lockd stops answering (SIGSTOP: a hung or paused process) while its
//! mount goes on: lockd can neither renew the node's lease nor tell the mount, and the
//! other nodes declare the node dead and replay its journal. The mount must stop
//! writing first, on its own, when its lease can no longer be confirmed. Real
//! processes; needs root and /dev/fuse (skipped otherwise, failing under CI).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use concord_tests::{can_mount, find_line, wait_for_line, Cluster, Spec};

/// The pid of node `id`'s lockd, found by its command line.
fn lockd_pid(c: &Cluster, id: u32) -> i32 {
    let pattern = format!("lockd --config {} --node {id}$", c.config.display());
    let o = Command::new("pgrep").args(["-f", &pattern]).output().expect("pgrep");
    let text = String::from_utf8_lossy(&o.stdout);
    let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 1, "one lockd of node {id} ({pattern}): {text}");
    pids[0]
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a lockd process this test's cluster started.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// Resumes a stopped lockd when dropped, so that a failing test does not leave a
/// stopped process that the cluster's stop would wait on.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) with SIGCONT on the process stopped by this test.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// What node 2 fsync'd in its directory before it was cut off.
const DURABLE: &[u8] = b"fsync'd on node 2 before it was cut off";

/// Node 2 makes a directory and an fsync'd file in it, and keeps a second file open
/// for writing (returned) with "before" fsync'd in it.
fn node_2_writes(c: &Cluster) -> std::fs::File {
    let m2 = c.mnt(2);
    std::fs::create_dir(m2.join("d2")).unwrap();
    let mut f = std::fs::File::create(m2.join("d2/durable")).unwrap();
    f.write_all(DURABLE).unwrap();
    f.sync_all().unwrap();
    let late = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(m2.join("d2/late")).unwrap();
    late.write_all_at(b"before", 0).unwrap();
    late.sync_all().unwrap();
    late
}

/// Once node 2 stopped writing: its write through `late` fails; node 1 creates in the
/// directory node 2 held (the others declared node 2 dead, fenced it and replayed its
/// journal) and reads what node 2 had fsync'd, and nothing node 2 wrote later.
fn node_1_takes_over(c: &Cluster, late: &std::fs::File) {
    let w = late.write_all_at(b"after the stop", 0).and_then(|()| late.sync_all());
    assert!(w.is_err(), "node 2 wrote after it stopped");
    let m1 = c.mnt(1);
    std::fs::write(m1.join("d2/from-node-1"), b"1").unwrap();
    assert_eq!(std::fs::read(m1.join("d2/durable")).unwrap(), DURABLE);
    assert_eq!(std::fs::read(m1.join("d2/late")).unwrap(), b"before", "node 2's write after the stop reached the disk");
    assert!(c.fenced().contains(&2), "node 2 was fenced: {:?}", c.fenced());
}

/// Node 2, a new member again, replaces its withdrawn mount and sees the same files;
/// then every node unmounts and fsck is clean.
fn node_2_rejoins(c: &mut Cluster, late: std::fs::File) {
    drop(late);
    c.kill_mount(2);
    c.wait_lockds_quorate();
    c.mount(&[2]);
    let m2 = c.mnt(2);
    assert_eq!(std::fs::read(m2.join("d2/from-node-1")).unwrap(), b"1");
    assert_eq!(std::fs::read(m2.join("d2/durable")).unwrap(), DURABLE);
    assert_eq!(std::fs::read(m2.join("d2/late")).unwrap(), b"before");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after unmount:\n{out}");
}

#[test]
fn a_node_whose_lockd_stops_answering_stops_writing_before_it_is_recovered() {
    const T: &str = "a_node_whose_lockd_stops_answering_stops_writing_before_it_is_recovered";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    // Node 2 keeps a file open for writing through the stop.
    let late = node_2_writes(&c);

    let pid = lockd_pid(&c, 2);
    signal(pid, libc::SIGSTOP);
    let resume = Resume(pid);

    // Node 2's mount stops on its own once its lease can no longer be confirmed...
    wait_for_line(&[c.mount_log(2)], &["lease was not confirmed"], Duration::from_secs(60));
    wait_for_line(&[c.mount_log(2)], &["device gate closed"], Duration::from_secs(10));
    // ... and from then on refuses writes, and says why.
    let st = c.status(2);
    assert_eq!(st["state"], "fenced", "{st}");
    assert!(st["stopped"].as_str().is_some_and(|w| w.contains("lease")), "concord status says why: {st}");

    node_1_takes_over(&c, &late);
    let logs = [c.mount_log(1), c.mount_log(3)];
    assert!(
        logs.iter().any(|l| find_line(l, &["journal recovered"]).is_some()),
        "a survivor recovered node 2's journal"
    );

    // Node 2's lockd goes on, finds itself declared dead, and its node comes back as a
    // new member; the withdrawn mount is replaced by a new one.
    drop(resume);
    node_2_rejoins(&mut c, late);
}

/// `concord dlm fault` on node `id`: cut it off from `peers` (empty: heal).
fn fault(c: &Cluster, id: u32, peers: &[u32]) {
    let config = c.config.to_str().unwrap().to_string();
    let node = id.to_string();
    let cut: Vec<String> = peers.iter().map(u32::to_string).collect();
    let cut = cut.join(",");
    let mut args = vec!["dlm", "fault", "--config", &config, "--node", &node];
    if peers.is_empty() {
        args.push("--heal");
    } else {
        args.extend(["--cut", &cut]);
    }
    let o = concord_tests::concord(&args);
    assert!(o.status.success(), "concord {args:?}: {}", concord_tests::text(&o));
}

/// Node 2 is cut off from the others by the transport's fault switch (messages dropped
/// both ways, as a network partition): it loses its quorum and lease and stops writing
/// on its own; the others declare it dead, fence it and replay its journal; once healed
/// it rejoins as a new member and mounts again.
#[test]
fn a_partitioned_node_stops_writing_and_is_recovered_then_rejoins() {
    const T: &str = "a_partitioned_node_stops_writing_and_is_recovered_then_rejoins";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let late = node_2_writes(&c);

    fault(&c, 2, &[1, 3]);
    fault(&c, 1, &[2]);
    fault(&c, 3, &[2]);
    // Node 2's mount stops writing (its lockd lost its lease, or the mount's own
    // watch saw it run out) ...
    wait_for_line(&[c.mount_log(2)], &["device gate closed"], Duration::from_secs(60));
    // ... and the others recover it.
    node_1_takes_over(&c, &late);

    // Healed: node 2 rejoins and mounts again.
    for id in [1, 2, 3] {
        fault(&c, id, &[]);
    }
    node_2_rejoins(&mut c, late);
}
