//! Golden scenario files for lock_dlm (testdata/*.txt), run over [`Sim`].
//!
//! Commands (`n=` names a node):
//!
//! | command | what |
//! |---|---|
//! | `disk journals=3 dirty=0,2` | the shared device: journal count, journals needing replay |
//! | `join n=1 [stall]` | n joins the lockspace (new view); `stall`: lock recovery not finished |
//! | `kill n=1 [stall]` | n dies; its journal needs replay if it had mounted |
//! | `recovery_done` | the stalled lock recovery finishes (slots, done, Joined) |
//! | `dlm_unblock` | locking resumes before recovery_done is delivered |
//! | `mount n=1` | control_mount |
//! | `first_done n=1` | the first mounter replays every dirty journal, then first_done |
//! | `recovered n=1 jid=2 [gaveup]` | n's filesystem finishes (or gives up) a journal |
//! | `advance ms=500` | the clock moves, timers fire |
//! | `pause n=1` / `resume n=1` | n stops / resumes taking inputs and timers |
//! | `hold_asts` / `release_asts [once]` | the DLM keeps ASTs back / delivers them (`once`: and holds the next ones) |
//! | `set_lvb gen=G` | writes control_lock's LVB generation directly |
//! | `state n=1` / `dlm` | show a node's state / the fake DLM |

use std::collections::BTreeMap;
use std::path::Path;

use super::sim::Sim;
use crate::golden::{parse_args, run_file};

fn num<T: std::str::FromStr>(args: &BTreeMap<String, String>, key: &str) -> T {
    let v = args.get(key).unwrap_or_else(|| panic!("missing {key}="));
    v.parse().unwrap_or_else(|_| panic!("bad {key}={v}"))
}

fn list(args: &BTreeMap<String, String>, key: &str) -> Vec<u32> {
    match args.get(key) {
        None => Vec::new(),
        Some(v) if v.is_empty() || v == "-" => Vec::new(),
        Some(v) => v.split(',').map(|x| x.parse().unwrap_or_else(|_| panic!("bad {key}={v}"))).collect(),
    }
}

fn exec(sim: &mut Sim, line: &str) -> String {
    let (cmd, args) = parse_args(line);
    let flag = |k: &str| args.contains_key(k);
    match cmd.as_str() {
        "disk" => sim.disk(num(&args, "journals"), &list(&args, "dirty")),
        "join" => sim.join(num(&args, "n"), flag("stall")),
        "kill" => sim.kill(num(&args, "n"), flag("stall")),
        "recovery_done" => sim.recovery_done(),
        "dlm_unblock" => sim.unblock_dlm(),
        "mount" => sim.mount(num(&args, "n")),
        "first_done" => sim.first_done(num(&args, "n")),
        "recovered" => sim.recovered(num(&args, "n"), num(&args, "jid"), flag("gaveup")),
        "advance" => sim.advance(num(&args, "ms")),
        "pause" => sim.pause(num(&args, "n"), true),
        "resume" => sim.pause(num(&args, "n"), false),
        "hold_asts" => sim.hold_asts(true, false),
        "release_asts" => sim.hold_asts(false, flag("once")),
        "set_lvb" => sim.set_lvb_generation(num(&args, "gen")),
        "state" => sim.state(num(&args, "n")),
        "dlm" => sim.dump_dlm(),
        other => panic!("unknown command {other:?}"),
    }
    sim.take_output()
}

fn run(file: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lock_dlm/testdata");
    let mut sim = Sim::new();
    run_file(&dir, file, &mut |line| exec(&mut sim, line));
}

macro_rules! golden {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                run($file);
            }
        )*
    };
}

golden! {
    first_mounter_alone => "first-mounter-alone.txt",
    second_mounter_waits_for_first_done => "second-mounter-waits.txt",
    second_mounter_blocked_by_first_mounter => "second-mounter-blocked-by-first.txt",
    mount_waits_for_journal_recovery => "mount-waits-for-journal-recovery.txt",
    mount_waits_for_generation_wait1_wait2_wait3 => "mount-waits-for-generation.txt",
    node_dies_recovery_control => "node-dies.txt",
    two_survivors_one_writes_lvb => "two-survivors.txt",
    recover_prep_during_recovery_keeps_locks_blocked => "prep-during-recovery.txt",
    control_work_block1_block2 => "control-work-block1-block2.txt",
    recovery_gaveup_retried_after_delay => "recovery-gaveup.txt",
    generation_disabled_refuses_mounts => "lvb-disabled.txt",
    slot_beyond_journals_refused => "slot-beyond-journals.txt",
    first_mounter_killed_next_becomes_first => "first-mounter-killed.txt",
    a_result_during_a_control_run_is_not_recovered_again => "result-while-control-work-runs.txt",
}
