//! The control work (`gfs2_control_func`): propagate recover_submit[] and
//! recover_result[] into the control_lock LVB, ask for journal recoveries, unblock
//! locks when none is left.

use super::control::{error_text, LockDlm, Timer};
use super::lvb::ControlLvb;
use super::types::{Action, AstResult, DlmOp, Flags, Level, LkFlags, Mode, NondiskLock, RecoveryResult};

/// Where the control work (`gfs2_control_func`) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WorkStep {
    Idle,
    /// control_lock EX VALBLK sent for this (block, start) pair.
    Ex {
        block_gen: u32,
        start_gen: u32,
    },
    /// control_lock NL (with the LVB if changed) sent.
    Nl {
        block_gen: u32,
        start_gen: u32,
        recover_size: usize,
    },
    /// "block1": back to NL without writing, nothing more to do.
    NlAbort,
}

impl WorkStep {
    pub(super) fn waits_for(self) -> Option<NondiskLock> {
        match self {
            WorkStep::Idle => None,
            _ => Some(NondiskLock::Control),
        }
    }
}

impl LockDlm {
    // ---- gfs2_control_func ----

    pub(super) fn control_work_runnable(&self) -> bool {
        self.work == WorkStep::Idle && self.mount.waits_for().is_none()
    }

    pub(super) fn queue_control_work(&mut self, now_ms: u64, delay_ms: u64) {
        let at = now_ms + delay_ms;
        let t = &mut self.timers[Timer::ControlWork as usize];
        *t = Some(t.map_or(at, |old| old.min(at)));
    }

    pub(super) fn control_work(&mut self) {
        // No MOUNT_DONE: still mounting, control_mount clears BLOCK_LOCKS. FIRST_MOUNT:
        // control_mount / first_done handle recovery.
        if !self.flags.contains(Flags::MOUNT_DONE) || self.flags.contains(Flags::FIRST_MOUNT) {
            return;
        }
        let (block_gen, start_gen) = (self.recover_block, self.recover_start);
        // Equal: between recover_prep and recover_done; wait for recover_done.
        if block_gen == start_gen {
            return;
        }
        let flags = LkFlags::CONVERT | LkFlags::VALBLK;
        self.request(NondiskLock::Control, DlmOp::Convert { mode: Mode::EX, flags, lvb: None });
        self.work = WorkStep::Ex { block_gen, start_gen };
    }

    pub(super) fn work_ast(&mut self, result: AstResult) {
        match (self.work, result) {
            (WorkStep::Ex { block_gen, start_gen }, AstResult::Granted { lvb }) => {
                if let Some(l) = lvb {
                    self.control_lvb = ControlLvb::from_bytes(l);
                }
                self.propagate(block_gen, start_gen);
            }
            (WorkStep::Ex { .. }, r) => {
                self.work = WorkStep::Idle;
                self.log(Level::Error, format!("control lock EX error {}", error_text(&r)));
            }
            (WorkStep::Nl { block_gen, start_gen, recover_size }, AstResult::Granted { .. }) => {
                self.work = WorkStep::Idle;
                self.recover_or_unblock(block_gen, start_gen, recover_size);
            }
            (WorkStep::Nl { .. }, r) => {
                self.work = WorkStep::Idle;
                self.log(Level::Error, format!("control lock NL error {}", error_text(&r)));
            }
            (WorkStep::NlAbort, _) | (WorkStep::Idle, _) => self.work = WorkStep::Idle,
        }
    }

    /// Under control_lock EX: fold recover_result[] and recover_submit[] into the LVB
    /// and convert back to NL, writing it if it changed.
    fn propagate(&mut self, block_gen: u32, start_gen: u32) {
        let lvb_gen = self.control_lvb.generation();
        self.lvb_bits = self.control_lvb;
        if block_gen != self.recover_block || start_gen != self.recover_start {
            // A recover_prep (and maybe recover_done) came while we waited for EX.
            self.log(Level::Info, format!("recover generation {start_gen} block1 {block_gen} {}", self.recover_block));
            let op = DlmOp::Convert { mode: Mode::NL, flags: LkFlags::CONVERT, lvb: None };
            self.request(NondiskLock::Control, op);
            self.work = WorkStep::NlAbort;
            return;
        }
        let recover_size = self.recover_submit.len();
        let mut write_lvb = false;
        if lvb_gen <= start_gen {
            // Clear the bits of jids recovered successfully; another node may have
            // cleared a bit already (every node recovers every failed jid, only the
            // first finds work).
            for jid in 0..recover_size {
                if self.recover_result[jid] != Some(RecoveryResult::Success) {
                    continue;
                }
                self.recover_result[jid] = None;
                if self.lvb_bits.jid(jid as u32) {
                    self.lvb_bits.clear_jid(jid as u32);
                    write_lvb = true;
                }
            }
        }
        if lvb_gen == start_gen {
            // Failed slots before start_gen are already in the LVB.
            for g in self.recover_submit.iter_mut() {
                if *g != 0 && *g < lvb_gen {
                    *g = 0;
                }
            }
        } else if lvb_gen < start_gen {
            // Failed slots before start_gen are not in the LVB yet.
            for jid in 0..recover_size {
                let g = self.recover_submit[jid];
                if g != 0 && g < start_gen {
                    self.recover_submit[jid] = 0;
                    self.lvb_bits.set_jid(jid as u32);
                }
            }
            // Even with no bit to set, the LVB gets the latest generation.
            write_lvb = true;
        }
        // else: lvb_gen > start_gen: a recover_done for lvb_gen comes soon.
        let op = if write_lvb {
            let mut lvb = self.lvb_bits;
            lvb.set_generation(start_gen);
            self.control_lvb = lvb;
            DlmOp::Convert { mode: Mode::NL, flags: LkFlags::CONVERT | LkFlags::VALBLK, lvb: Some(lvb.to_bytes()) }
        } else {
            DlmOp::Convert { mode: Mode::NL, flags: LkFlags::CONVERT, lvb: None }
        };
        self.request(NondiskLock::Control, op);
        self.work = WorkStep::Nl { block_gen, start_gen, recover_size };
    }

    /// Back at NL: recover every jid whose bit is set, or, with none, unblock locks
    /// unless a recover_prep came meanwhile.
    fn recover_or_unblock(&mut self, block_gen: u32, start_gen: u32, recover_size: usize) {
        let limit = recover_size.min(self.journals as usize) as u32;
        let mut recover_set = 0;
        let mut unfolded = 0;
        for jid in 0..limit {
            if self.lvb_bits.jid(jid) {
                // Recovered here after this run read the LVB: the result that came
                // meanwhile queued the next run, which clears the bit. Recovering it
                // again would replay a clean journal (GFS2's recover_set finds such a
                // journal busy only while its recovery still runs).
                if self.recover_result.get(jid as usize) == Some(&Some(RecoveryResult::Success)) {
                    self.log(
                        Level::Info,
                        format!("jid {jid} already recovered, its result not yet in the LVB (generation {start_gen})"),
                    );
                    unfolded += 1;
                    continue;
                }
                self.log(Level::Info, format!("recover generation {start_gen} jid {jid}"));
                self.actions.push_back(Action::RecoverJournal { jid });
                recover_set += 1;
            }
        }
        if recover_set > 0 || unfolded > 0 {
            return;
        }
        if self.recover_block == block_gen && self.recover_start == start_gen {
            let was_blocked = self.flags.contains(Flags::BLOCK_LOCKS);
            self.flags.clear(Flags::BLOCK_LOCKS);
            self.log(Level::Info, format!("recover generation {start_gen} done"));
            if was_blocked {
                self.actions.push_back(Action::UnblockLocks);
            }
        } else {
            self.log(Level::Info, format!("recover generation {start_gen} block2 {block_gen} {}", self.recover_block));
        }
    }
}
