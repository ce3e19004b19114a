//! The mount thread of the seed as steps: `control_mount` (first mounter or wait for
//! recoveries) and `control_first_done`.

use super::control::{error_text, LockDlm, Timer, MOUNT_RETRY_MS};
use super::lvb::{ControlLvb, GENERATION_DISABLED};
use super::types::{Action, AstResult, DlmOp, Flags, Level, LkFlags, Mode, NondiskLock, RefuseReason};

/// Where the mount thread of the seed (`control_mount`, `control_first_done`) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MountStep {
    /// Not mounting (before `control_mount`, after it ended, between first-mount
    /// recovery and `first_done`).
    Idle,
    /// control_lock NL VALBLK (new lock) sent.
    ControlNl,
    /// mounted_lock NL (new lock) sent.
    MountedNl,
    /// restart: mounted_lock back to NL sent.
    DemoteMounted,
    /// restart: sleeping [`MOUNT_RETRY_MS`] before trying control_lock EX.
    Delay,
    /// control_lock EX NOQUEUE sent.
    ControlEx,
    /// mounted_lock EX NOQUEUE sent.
    MountedEx,
    /// mounted_lock PR NOQUEUE sent.
    MountedPr,
    /// Not first mounter: control_lock back to NL sent; `lvb_gen` as read under EX.
    ControlNlAfter { lvb_gen: u32 },
    /// `first_done` waits for recover_done (DFL_DLM_RECOVERY).
    FirstDoneWait,
    /// first_done: mounted_lock EX -> PR sent.
    FirstDoneMountedPr,
    /// first_done: control_lock EX -> NL with the LVB sent.
    FirstDoneControlNl,
}

impl MountStep {
    /// The lock whose AST this step waits for.
    pub(super) fn waits_for(self) -> Option<NondiskLock> {
        use MountStep::*;
        match self {
            ControlNl | ControlEx | ControlNlAfter { .. } | FirstDoneControlNl => Some(NondiskLock::Control),
            MountedNl | DemoteMounted | MountedEx | MountedPr | FirstDoneMountedPr => Some(NondiskLock::Mounted),
            Idle | Delay | FirstDoneWait => None,
        }
    }

    /// A step of `control_mount` (not of first_done).
    pub(super) fn is_mounting(self) -> bool {
        !matches!(
            self,
            MountStep::Idle | MountStep::FirstDoneWait | MountStep::FirstDoneMountedPr | MountStep::FirstDoneControlNl
        )
    }
}

impl LockDlm {
    // ---- control_mount ----

    pub(super) fn mount_ast(&mut self, now_ms: u64, result: AstResult) {
        use MountStep::*;
        let granted = matches!(result, AstResult::Granted { .. });
        match self.mount {
            ControlNl => {
                if let AstResult::Granted { lvb: Some(l) } = result {
                    self.control_lvb = ControlLvb::from_bytes(l);
                }
                if !granted {
                    return self.mount_error(NondiskLock::Control, "NL", &result);
                }
                self.request(NondiskLock::Mounted, DlmOp::Lock { mode: Mode::NL, flags: LkFlags::empty() });
                self.mount = MountedNl;
            }
            MountedNl => {
                if !granted {
                    return self.mount_error(NondiskLock::Mounted, "NL", &result);
                }
                self.restart(now_ms);
            }
            DemoteMounted => {
                if !granted {
                    return self.mount_error(NondiskLock::Mounted, "NL", &result);
                }
                self.delay(now_ms);
            }
            ControlEx => match result {
                AstResult::Granted { lvb } => {
                    if let Some(l) = lvb {
                        self.control_lvb = ControlLvb::from_bytes(l);
                    }
                    let flags = LkFlags::CONVERT | LkFlags::NOQUEUE;
                    self.request(NondiskLock::Mounted, DlmOp::Convert { mode: Mode::EX, flags, lvb: None });
                    self.mount = MountedEx;
                }
                AstResult::TryFailed => self.restart(now_ms),
                AstResult::Error(_) => self.mount_error(NondiskLock::Control, "EX", &result),
            },
            MountedEx => match result {
                AstResult::Granted { .. } => self.locks_done(),
                AstResult::TryFailed => {
                    let flags = LkFlags::CONVERT | LkFlags::NOQUEUE;
                    self.request(NondiskLock::Mounted, DlmOp::Convert { mode: Mode::PR, flags, lvb: None });
                    self.mount = MountedPr;
                }
                AstResult::Error(_) => self.mount_error(NondiskLock::Mounted, "EX", &result),
            },
            MountedPr => {
                if !granted {
                    // Not even -EAGAIN should happen here.
                    return self.mount_error(NondiskLock::Mounted, "PR", &result);
                }
                self.locks_done();
            }
            ControlNlAfter { lvb_gen } => {
                if !granted {
                    return self.mount_error(NondiskLock::Control, "NL", &result);
                }
                self.mount_check(now_ms, lvb_gen);
            }
            FirstDoneMountedPr => {
                if !granted {
                    self.mount = Idle;
                    let e = error_text(&result);
                    self.log(Level::Error, format!("control_first_done mounted PR error {e}"));
                    return;
                }
                let lvb = Some(self.control_lvb.to_bytes());
                let flags = LkFlags::CONVERT | LkFlags::VALBLK;
                self.request(NondiskLock::Control, DlmOp::Convert { mode: Mode::NL, flags, lvb });
                self.mount = FirstDoneControlNl;
            }
            FirstDoneControlNl => {
                self.mount = Idle;
                if !granted {
                    let e = error_text(&result);
                    self.log(Level::Error, format!("control_first_done control NL error {e}"));
                }
            }
            Idle | Delay | FirstDoneWait => debug_assert!(false, "mount AST in step {:?}", self.mount),
        }
    }

    /// The `restart:` label: mounted_lock back to NL if needed, then sleep.
    fn restart(&mut self, now_ms: u64) {
        if self.held[NondiskLock::Mounted.index()] != Some(Mode::NL) {
            let op = DlmOp::Convert { mode: Mode::NL, flags: LkFlags::CONVERT, lvb: None };
            self.request(NondiskLock::Mounted, op);
            self.mount = MountStep::DemoteMounted;
        } else {
            self.delay(now_ms);
        }
    }

    fn delay(&mut self, now_ms: u64) {
        self.retries += 1;
        self.timers[Timer::MountRetry as usize] = Some(now_ms + MOUNT_RETRY_MS);
        self.mount = MountStep::Delay;
    }

    /// The `locks_done:` label: control_lock EX and mounted_lock EX or PR are held.
    fn locks_done(&mut self) {
        let lvb_gen = self.control_lvb.generation();
        self.lvb_bits = self.control_lvb;
        if lvb_gen == GENERATION_DISABLED {
            self.log(Level::Error, "control_mount control_lock disabled".into());
            return self.mount_fail(RefuseReason::Disabled);
        }
        if self.held[NondiskLock::Mounted.index()] == Some(Mode::EX) {
            // First mounter: keep both EX while doing first recovery.
            self.set_block_locks(false);
            self.flags.set(Flags::MOUNT_DONE);
            self.flags.set(Flags::FIRST_MOUNT);
            self.first = true;
            self.log(Level::Info, format!("first mounter control generation {lvb_gen}"));
            self.mount = MountStep::Idle;
            self.mount_ready();
            return;
        }
        let op = DlmOp::Convert { mode: Mode::NL, flags: LkFlags::CONVERT, lvb: None };
        self.request(NondiskLock::Control, op);
        self.mount = MountStep::ControlNlAfter { lvb_gen };
    }

    /// Not first mounter: wait until the LVB generation reaches our mount generation
    /// and the latest recovery generation, with no jid bits and no DLM recovery.
    fn mount_check(&mut self, now_ms: u64, lvb_gen: u32) {
        if !self.lvb_bits.all_jids_clear() {
            self.log(Level::Info, "control_mount wait for journal recovery".into());
            return self.restart(now_ms);
        }
        let (block_gen, start_gen, mount_gen) = (self.recover_block, self.recover_start, self.recover_mount);
        let wait = if lvb_gen < mount_gen {
            // Mounted nodes have not yet put our generation (and maybe new bits) in.
            Some("wait1")
        } else if lvb_gen != start_gen {
            // Nor the latest recovery generation.
            Some("wait2")
        } else if block_gen == start_gen {
            // DLM recovery in progress.
            Some("wait3")
        } else {
            None
        };
        if let Some(w) = wait {
            let flags = self.flags.bits();
            self.log(
                Level::Info,
                format!(
                    "control_mount {w} block {block_gen} start {start_gen} mount {mount_gen} lvb {lvb_gen} flags {flags:x}"
                ),
            );
            return self.restart(now_ms);
        }
        self.set_block_locks(false);
        self.flags.set(Flags::MOUNT_DONE);
        self.clear_recover_arrays();
        self.mount = MountStep::Idle;
        self.mount_ready();
    }

    fn mount_ready(&mut self) {
        // control_mount refuses to start without a jid.
        let jid = self.jid.unwrap_or_default();
        self.actions.push_back(Action::MountReady { jid, first: self.first });
    }

    /// `fs_err(sdp, "control_mount <lock> <what> error %d")`, then `fail:`.
    fn mount_error(&mut self, lock: NondiskLock, what: &str, result: &AstResult) {
        let error = error_text(result);
        self.log(Level::Error, format!("control_mount {lock} {what} error {error}"));
        self.mount_fail(RefuseReason::Dlm { lock, what: what.to_string(), error });
    }

    /// The `fail:` label: unlock what we hold, refuse.
    fn mount_fail(&mut self, reason: RefuseReason) {
        for lock in [NondiskLock::Mounted, NondiskLock::Control] {
            if self.held[lock.index()].is_some() || self.pending[lock.index()].is_some() {
                self.request(lock, DlmOp::Unlock);
            }
        }
        self.timers[Timer::MountRetry as usize] = None;
        self.mount = MountStep::Idle;
        self.refuse(reason);
    }

    pub(super) fn refuse(&mut self, reason: RefuseReason) {
        self.actions.push_back(Action::MountRefused(reason));
    }

    // ---- control_first_done ----

    pub(super) fn first_done_step(&mut self) {
        let (start_gen, block_gen) = (self.recover_start, self.recover_block);
        if self.flags.contains(Flags::BLOCK_LOCKS)
            || !self.flags.contains(Flags::MOUNT_DONE)
            || !self.flags.contains(Flags::FIRST_MOUNT)
            || self.mount != MountStep::Idle
        {
            // Sanity check, should not happen.
            let flags = self.flags.bits();
            self.log(Level::Error, format!("control_first_done start {start_gen} block {block_gen} flags {flags:x}"));
            return;
        }
        if start_gen == block_gen {
            // Wait for the end of a DLM recovery cycle to switch from first mounter
            // recovery; recover_slot callbacks until then are ignored (the failed
            // nodes had not mounted).
            self.log(Level::Info, format!("control_first_done wait gen {start_gen}"));
            self.mount = MountStep::FirstDoneWait;
            return;
        }
        self.flags.clear(Flags::FIRST_MOUNT);
        self.flags.set(Flags::FIRST_MOUNT_DONE);
        self.clear_recover_arrays();
        self.lvb_bits.clear();
        let mut lvb = self.lvb_bits;
        lvb.set_generation(start_gen);
        self.control_lvb = lvb;
        let op = DlmOp::Convert { mode: Mode::PR, flags: LkFlags::CONVERT, lvb: None };
        self.request(NondiskLock::Mounted, op);
        self.mount = MountStep::FirstDoneMountedPr;
    }
}
