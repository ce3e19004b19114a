//! Golden scenario tests over [`Glocks`] (format: [`crate::golden`]).
//!
//! Commands (holders are named by letters; `at=MS` on any command first sets the clock,
//! which starts at 0 and never goes back):
//!
//! * `acquire h=A name=2/10 state=EX [flags=TRY|ANY]`
//! * `try h=A name=2/10 state=SH`: [`Glocks::try_cached`]; prints `refused` when it
//!   does not grant.
//! * `release h=A`
//! * `ast name=2/10 result=granted mode=EX` (or `result=tryfailed|cancelled|deadlock|error`)
//! * `bast name=2/10 mode=PR`
//! * `sync-done name=..`, `inval-done name=..`, `inval-unconfirmed name=..` (the
//!   invalidation ran but the kernel did not confirm it in time), `inval-confirmed
//!   name=..` (it confirmed later)
//! * `tick ms=MS`: advance the clock by MS and fire due timers.
//! * `block`, `unblock`: recovery's BLOCK_LOCKS.
//! * `evict name=..`: prints `busy` when refused.
//! * `dump name=..`, `stats name=..`, `deadline`, `top` (every glock that is busy or was
//!   asked for: [`Glocks::top`]).
//!
//! Output: the actions, one per line: `dlm 2/10 NL->EX flags=CONVERT|QUECVT`,
//! `cancel 2/10`, `unlock 2/10`, `sync 2/10`, `invalidate 2/10` (`data-only` when
//! metadata stays), `granted A` (`as DF` when in another state than asked),
//! `failed B TryAgain`. An immediate grant or failure of `acquire` prints the same way.
//! The invariants are checked after every command.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Action, AstResult, DlmMode, GlState, GlockName, Glocks, HolderFlags, HolderId, Poll, Tunables};
use crate::golden::{parse_args, run_file};

struct Interp {
    g: Glocks,
    now: u64,
    ids: BTreeMap<String, HolderId>,
    names: BTreeMap<HolderId, String>,
    asked: BTreeMap<HolderId, GlState>,
}

fn arg<'a>(args: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    args.get(key).unwrap_or_else(|| panic!("missing {key}=")).as_str()
}

fn name_arg(args: &BTreeMap<String, String>) -> GlockName {
    let text = arg(args, "name");
    GlockName::parse(text).unwrap_or_else(|| panic!("bad glock name {text}"))
}

fn state_arg(args: &BTreeMap<String, String>) -> GlState {
    let text = arg(args, "state");
    GlState::parse(text).unwrap_or_else(|| panic!("bad state {text}"))
}

fn mode_arg(args: &BTreeMap<String, String>) -> DlmMode {
    let text = arg(args, "mode");
    DlmMode::parse(text).unwrap_or_else(|| panic!("bad mode {text}"))
}

impl Interp {
    fn new() -> Interp {
        Interp {
            g: Glocks::new(Tunables::default()),
            now: 0,
            ids: BTreeMap::new(),
            names: BTreeMap::new(),
            asked: BTreeMap::new(),
        }
    }

    fn holder(&self, args: &BTreeMap<String, String>) -> HolderId {
        let h = arg(args, "h");
        *self.ids.get(h).unwrap_or_else(|| panic!("unknown holder {h}"))
    }

    fn label(&self, id: HolderId) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
    }

    fn outcome(&self, id: HolderId, result: Result<GlState, super::GlockError>) -> String {
        match result {
            Ok(s) if self.asked.get(&id) == Some(&s) => format!("granted {}", self.label(id)),
            Ok(s) => format!("granted {} as {s}", self.label(id)),
            Err(e) => format!("failed {} {e}", self.label(id)),
        }
    }

    fn register(&mut self, args: &BTreeMap<String, String>, id: HolderId, state: GlState) {
        let h = arg(args, "h").to_string();
        self.ids.insert(h.clone(), id);
        self.names.insert(id, h);
        self.asked.insert(id, state);
    }

    fn exec(&mut self, line: &str) -> String {
        let (cmd, args) = parse_args(line);
        if let Some(at) = args.get("at") {
            let at: u64 = at.parse().expect("at=MS");
            assert!(at >= self.now, "time goes back: at={at} after {}", self.now);
            self.now = at;
        }
        let now = self.now;
        let mut out = Vec::new();
        match cmd.as_str() {
            "acquire" => {
                let flags = args
                    .get("flags")
                    .map_or(HolderFlags::NONE, |f| HolderFlags::parse(f).unwrap_or_else(|| panic!("bad flags {f}")));
                let state = state_arg(&args);
                let (id, poll) = self.g.acquire(name_arg(&args), state, flags, now);
                self.register(&args, id, state);
                match poll {
                    Poll::Granted(s) => out.push(self.outcome(id, Ok(s))),
                    Poll::Failed(e) => out.push(self.outcome(id, Err(e))),
                    Poll::Pending => {}
                }
            }
            "try" => {
                let state = state_arg(&args);
                match self.g.try_cached(name_arg(&args), state) {
                    Some(id) => {
                        self.register(&args, id, state);
                        let held = self.g.holder(id).and_then(|(_, s)| s).expect("granted holder has a state");
                        out.push(self.outcome(id, Ok(held)));
                    }
                    None => out.push("refused".to_string()),
                }
            }
            "release" => {
                let id = self.holder(&args);
                self.g.release(id, now);
            }
            "ast" => {
                let result = match arg(&args, "result") {
                    "granted" => AstResult::Granted(mode_arg(&args)),
                    "tryfailed" => AstResult::TryFailed,
                    "cancelled" => AstResult::Cancelled,
                    "deadlock" => AstResult::Deadlock,
                    "error" => AstResult::Error,
                    other => panic!("bad result {other}"),
                };
                self.g.handle_ast(name_arg(&args), result, now);
            }
            "bast" => self.g.handle_bast(name_arg(&args), mode_arg(&args), now),
            "sync-done" => self.g.sync_done(name_arg(&args), now),
            "inval-done" => self.g.inval_done(name_arg(&args), now),
            "inval-unconfirmed" => self.g.inval_unconfirmed(name_arg(&args), now),
            "inval-confirmed" => self.g.inval_confirmed(name_arg(&args), now),
            "tick" => {
                self.now += arg(&args, "ms").parse::<u64>().expect("ms=MS");
                self.g.handle_timeout(self.now);
            }
            "block" => self.g.set_blocked(true, now),
            "unblock" => self.g.set_blocked(false, now),
            "evict" => {
                if !self.g.evict(name_arg(&args), now) {
                    out.push("busy".to_string());
                }
            }
            "dump" => {
                for l in self.g.dump(name_arg(&args), now).unwrap_or_else(|| vec!["(no glock)".to_string()]) {
                    // Show holders by their labels.
                    out.push(match l.rsplit_once(" p:") {
                        Some((head, id)) if l.starts_with(" H:") => {
                            let id = HolderId(id.parse().expect("holder id"));
                            format!("{head} p:{}", self.label(id))
                        }
                        _ => l,
                    });
                }
            }
            "top" => {
                let mut rows = self.g.top(now);
                rows.sort_by_key(|t| t.name);
                for t in rows {
                    out.push(format!(
                        "top {} s:{} holders={} waiters={} wait={} asked={}",
                        t.name, t.state, t.holders, t.waiters, t.wait_ms, t.stats.bcount
                    ));
                }
            }
            "stats" => out.push(self.g.glstats(name_arg(&args)).unwrap_or_else(|| "(no glock)".to_string())),
            "deadline" => out.push(match self.g.next_deadline() {
                Some(d) => format!("deadline {d}"),
                None => "deadline none".to_string(),
            }),
            other => panic!("unknown command {other}"),
        }
        while let Some(a) = self.g.poll_action() {
            out.push(match a {
                Action::Dlm { name, req } => format!("dlm {name} {}->{} flags={}", req.from, req.to, req.flags),
                Action::Cancel { name } => format!("cancel {name}"),
                Action::Unlock { name } => format!("unlock {name}"),
                Action::Sync { name } => format!("sync {name}"),
                Action::Invalidate { name, metadata: true } => format!("invalidate {name}"),
                Action::Invalidate { name, metadata: false } => format!("invalidate {name} data-only"),
                Action::Granted { holder, state } => self.outcome(holder, Ok(state)),
                Action::Failed { holder, error } => self.outcome(holder, Err(error)),
            });
        }
        if let Err(e) = self.g.check_invariants() {
            panic!("after `{line}`: {e}");
        }
        out.join("\n")
    }
}

fn run(file: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/glock/testdata");
    let mut interp = Interp::new();
    run_file(&dir, file, &mut |cmd| interp.exec(cmd));
}

#[test]
fn top_shows_waits_and_callbacks() {
    run("top.txt");
}

#[test]
fn cached_reacquire_sends_no_message() {
    run("cached-reacquire.txt");
}

#[test]
fn may_grant_under_cached_states() {
    run("may-grant.txt");
}

#[test]
fn exact_waits_beside_a_holder_sharing_a_stronger_state() {
    run("exact-beside-shared.txt");
}

#[test]
fn inode_demote_waits_min_hold_time() {
    run("demote-min-hold-time.txt");
}

#[test]
fn rgrp_demotes_at_once() {
    run("rgrp-demotes-at-once.txt");
}

#[test]
fn demote_waits_for_holders() {
    run("demote-waits-for-holders.txt");
}

#[test]
fn demote_from_ex_syncs_then_invalidates_then_converts() {
    run("demote-ex-order.txt");
}

#[test]
fn demote_ex_to_sh_keeps_cache() {
    run("demote-ex-to-sh.txt");
}

#[test]
fn try_lock_failures() {
    run("try-failure.txt");
}

#[test]
fn try_1cb_flags() {
    run("try-1cb.txt");
}

#[test]
fn any_granted_in_alternate_mode() {
    run("any-alternate.txt");
}

#[test]
fn priority_goes_to_queue_head() {
    run("priority.txt");
}

#[test]
fn conversion_sh_to_ex() {
    run("convert-sh-ex.txt");
}

#[test]
fn edeadlk_unlocks_and_retries() {
    run("edeadlk-retry.txt");
}

#[test]
fn block_locks_during_recovery() {
    run("blocked-by-recovery.txt");
}

#[test]
fn hold_time_adapts() {
    run("hold-time-adaptation.txt");
}

#[test]
fn stats_and_dump() {
    run("stats-dump.txt");
}

#[test]
fn evict_unlocks() {
    run("evict.txt");
}

#[test]
fn released_waiter_cancels_request() {
    run("cancel.txt");
}

#[test]
fn stuck_invalidation_lends_the_glock_to_waiters_then_redoes_the_demote() {
    run("demote-lend-waiters.txt");
}

#[test]
fn stuck_invalidation_converts_anyway_after_the_cap() {
    run("demote-lend-cap.txt");
}

#[test]
fn dlm_error_fails_waiters() {
    run("dlm-error.txt");
}
