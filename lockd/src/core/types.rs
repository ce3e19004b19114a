//! Lock modes, flags, statuses, LVBs and errors: the vocabulary of the DLM, with the
//! numeric values of the Linux DLM (`include/uapi/linux/dlmconstants.h`) so that dumps
//! and logs can be read side by side with the kernel's.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node of the cluster (the `id` of the configuration file).
pub type NodeId = u32;

/// Length in bytes of a lock value block (GFS2's `GDLM_LVB_SIZE`).
pub const LVB_LEN: usize = 32;

/// A lock value block: 32 bytes carried with a resource and read or written by locks
/// that ask for it with [`Flags::VALBLK`].
pub type Lvb = [u8; LVB_LEN];

/// Longest resource name, in bytes (`DLM_RESNAME_MAXLEN`).
pub const MAX_NAME_LEN: usize = 64;

/// A lock id, unique among the live locks of one node (the `sb_lkid` of the lksb).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LkId(pub u64);

impl fmt::Display for LkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A lock mode. The order of the variants is the DLM's (NL = 0 .. EX = 5); it is the
/// order used for "higher mode" in BAST suppression and LVB rules, not a lattice
/// (CW and PR are not comparable in strength).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Mode {
    /// Null: no access, keeps the lock (and its LVB) alive.
    NL = 0,
    /// Concurrent read.
    CR = 1,
    /// Concurrent write.
    CW = 2,
    /// Protected read.
    PR = 3,
    /// Protected write.
    PW = 4,
    /// Exclusive.
    EX = 5,
}

/// The DLM compatibility matrix (`__dlm_compat_matrix`), NL..EX by NL..EX.
const COMPAT: [[bool; 6]; 6] = [
    // NL    CR     CW     PR     PW     EX
    [true, true, true, true, true, true],      // NL
    [true, true, true, true, true, false],     // CR
    [true, true, true, false, false, false],   // CW
    [true, true, false, true, false, false],   // PR
    [true, true, false, false, false, false],  // PW
    [true, false, false, false, false, false], // EX
];

/// Conversions that may carry QUECVT (`__quecvt_compat_matrix`): only to a higher mode.
const QUECVT_OK: [[bool; 6]; 6] = [
    // NL    CR     CW     PR     PW     EX
    [false, true, true, true, true, true],      // NL
    [false, false, true, true, true, true],     // CR
    [false, false, false, true, true, true],    // CW
    [false, false, true, false, true, true],    // PR
    [false, false, false, false, false, true],  // PW
    [false, false, false, false, false, false], // EX
];

/// Whether locks in modes `a` and `b` may be granted at the same time.
pub fn compatible(a: Mode, b: Mode) -> bool {
    COMPAT[a as usize][b as usize]
}

impl Mode {
    /// All modes, NL first.
    pub const ALL: [Mode; 6] = [Mode::NL, Mode::CR, Mode::CW, Mode::PR, Mode::PW, Mode::EX];

    /// Whether this mode may be granted beside `other`.
    pub fn compatible(self, other: Mode) -> bool {
        compatible(self, other)
    }

    /// The DLM's number for the mode (`DLM_LOCK_NL` = 0 .. `DLM_LOCK_EX` = 5).
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The mode's name, as in dumps and scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::NL => "NL",
            Mode::CR => "CR",
            Mode::CW => "CW",
            Mode::PR => "PR",
            Mode::PW => "PW",
            Mode::EX => "EX",
        }
    }

    /// Whether a conversion from `self` to `to` may be queued with QUECVT.
    pub(crate) fn quecvt_allowed(self, to: Mode) -> bool {
        QUECVT_OK[self as usize][to as usize]
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL.into_iter().find(|m| m.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| format!("unknown mode {s:?}"))
    }
}

/// What a grant or conversion does with the LVB (`dlm_lvb_operations`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LvbOp {
    /// The resource's LVB is copied into the lock (returned to the caller).
    Read,
    /// The lock's LVB is written to the resource.
    Write,
    /// Nothing happens to the LVB.
    Keep,
}

/// The LVB transfer for a lock going from `granted` (None for a new request) to
/// `requested`: read on a new grant or a conversion up from NL/CR/CW/PR (and PW→EX),
/// written on any conversion from PW or EX (except PW→EX), nothing otherwise.
pub(crate) fn lvb_op(granted: Option<Mode>, requested: Mode) -> LvbOp {
    use Mode::*;
    match granted {
        None => LvbOp::Read,
        Some(PW) if requested == EX => LvbOp::Read,
        Some(PW) | Some(EX) => LvbOp::Write,
        Some(g) if requested >= g => LvbOp::Read,
        Some(_) => LvbOp::Keep,
    }
}

macro_rules! bitset {
    ($(#[$m:meta])* $name:ident($t:ty) { $($(#[$fm:meta])* $flag:ident = $v:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub struct $name(pub $t);

        impl $name {
            $($(#[$fm])* pub const $flag: $name = $name($v);)*
            const NAMES: &'static [(&'static str, $t)] = &[$((stringify!($flag), $v),)*];

            /// No flag set.
            pub const fn empty() -> Self {
                $name(0)
            }
            /// Whether every flag of `other` is set in `self`.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }
            /// Whether any flag of `other` is set in `self`.
            pub const fn intersects(self, other: $name) -> bool {
                self.0 & other.0 != 0
            }
            /// Whether no flag is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }
            /// `self` without the flags of `other`.
            pub const fn without(self, other: $name) -> Self {
                $name(self.0 & !other.0)
            }
        }

        impl BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }
        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }
        impl BitAnd for $name {
            type Output = $name;
            fn bitand(self, rhs: $name) -> $name {
                $name(self.0 & rhs.0)
            }
        }

        /// Flag names joined by `|` (empty for no flag); unknown bits in hex.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut rest = self.0;
                let mut first = true;
                for (n, v) in Self::NAMES {
                    if rest & v != 0 {
                        if !first {
                            f.write_str("|")?;
                        }
                        f.write_str(n)?;
                        first = false;
                        rest &= !v;
                    }
                }
                if rest != 0 {
                    if !first {
                        f.write_str("|")?;
                    }
                    write!(f, "{rest:#x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        /// Parses `A|B|C` (empty string: no flag).
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = 0;
                for part in s.split('|').filter(|p| !p.is_empty()) {
                    let v = Self::NAMES
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(part))
                        .map(|(_, v)| *v)
                        .ok_or_else(|| format!("unknown flag {part:?}"))?;
                    out |= v;
                }
                Ok($name(out))
            }
        }
    };
}

bitset! {
    /// Lock request flags (`DLM_LKF_*`, same bit values), plus Concord's NOEXP.
    Flags(u32) {
        /// Fail with -EAGAIN instead of waiting.
        NOQUEUE = 0x0001,
        /// The operation is a cancel (set by [`crate::core::Lockspace::cancel`]; not
        /// accepted by request or convert).
        CANCEL = 0x0002,
        /// The request converts an existing lock (implied by convert; not accepted by a
        /// new request).
        CONVERT = 0x0004,
        /// Read or write the lock value block.
        VALBLK = 0x0008,
        /// Queue the conversion behind other conversions even if it could be granted.
        QUECVT = 0x0010,
        /// Grant a new NL request at once, ignoring the queues.
        EXPEDITE = 0x0400,
        /// With NOQUEUE: still send BASTs to the locks that blocked the request.
        NOQUEUEBAST = 0x0800,
        /// Put the request at the head of its queue.
        HEADQUE = 0x1000,
        /// Grant as soon as compatible with the granted locks, ignoring queue order.
        NOORDER = 0x2000,
        /// If the requested mode cannot be granted, try PR (status has ALTMODE).
        ALTPR = 0x8000,
        /// If the requested mode cannot be granted, try CW (status has ALTMODE).
        ALTCW = 0x10000,
        /// Concord: the request may pass while the filesystem blocks locks for
        /// recovery (GFS2's LM_FLAG_NOEXP). Carried through; no effect in the core.
        NOEXP = 0x8000_0000,
    }
}

bitset! {
    /// Flags of a completion AST (`DLM_SBF_*`, same bit values).
    SbFlags(u8) {
        /// The lock's granted mode was demoted (CONVDEADLK; never set by Concord,
        /// kept for the status word's layout).
        DEMOTED = 0x01,
        /// The LVB may be stale (its last writer was lost in recovery).
        VALNOTVALID = 0x02,
        /// The lock was granted in its ALTPR/ALTCW alternate mode.
        ALTMODE = 0x04,
    }
}

impl Flags {
    /// The flags a new request may carry.
    pub const REQUEST_ALLOWED: Flags = Flags(
        Flags::NOQUEUE.0
            | Flags::VALBLK.0
            | Flags::EXPEDITE.0
            | Flags::NOQUEUEBAST.0
            | Flags::HEADQUE.0
            | Flags::NOORDER.0
            | Flags::ALTPR.0
            | Flags::ALTCW.0
            | Flags::NOEXP.0,
    );
    /// The flags a conversion may carry.
    pub const CONVERT_ALLOWED: Flags = Flags(
        Flags::NOQUEUE.0
            | Flags::CONVERT.0
            | Flags::VALBLK.0
            | Flags::QUECVT.0
            | Flags::NOQUEUEBAST.0
            | Flags::HEADQUE.0
            | Flags::NOORDER.0
            | Flags::ALTPR.0
            | Flags::ALTCW.0
            | Flags::NOEXP.0,
    );
}

/// `EAGAIN` on Linux.
pub const EAGAIN: i32 = 11;
/// `EDEADLK` on Linux.
pub const EDEADLK: i32 = 35;
/// `DLM_EUNLOCK`: completion status of an unlock is `-DLM_EUNLOCK`.
pub const DLM_EUNLOCK: i32 = 0x10002;
/// `DLM_ECANCEL`: completion status of a cancel is `-DLM_ECANCEL`.
pub const DLM_ECANCEL: i32 = 0x10001;

/// The status of a completion AST (the lksb's `sb_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    /// 0: the request or conversion was granted.
    Granted,
    /// -EAGAIN: a NOQUEUE request could not be granted at once.
    Again,
    /// -DLM_EUNLOCK: the lock was unlocked.
    Unlocked,
    /// -DLM_ECANCEL: the waiting request or conversion was cancelled.
    Canceled,
    /// -EDEADLK: the conversion would have deadlocked and was refused.
    Deadlock,
}

impl Status {
    /// The Linux value of `sb_status`.
    pub fn code(self) -> i32 {
        match self {
            Status::Granted => 0,
            Status::Again => -EAGAIN,
            Status::Unlocked => -DLM_EUNLOCK,
            Status::Canceled => -DLM_ECANCEL,
            Status::Deadlock => -EDEADLK,
        }
    }

    /// The status for a Linux `sb_status` value.
    pub fn from_code(code: i32) -> Option<Status> {
        [Status::Granted, Status::Again, Status::Unlocked, Status::Canceled, Status::Deadlock]
            .into_iter()
            .find(|s| s.code() == code)
    }

    /// Short name, as in scenario files: `0`, `-EAGAIN`, `-DLM_EUNLOCK`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Granted => "0",
            Status::Again => "-EAGAIN",
            Status::Unlocked => "-DLM_EUNLOCK",
            Status::Canceled => "-DLM_ECANCEL",
            Status::Deadlock => "-EDEADLK",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors returned by the local calls. An error means the call was not accepted and
/// no AST will follow for it (as when `dlm_lock` returns an error).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Resource names are 1 to 64 bytes.
    #[error("resource name of {len} bytes (must be 1..={MAX_NAME_LEN})")]
    BadName {
        /// Length of the rejected name.
        len: usize,
    },
    /// A flag or flag combination that this call does not accept (-EINVAL).
    #[error("invalid flags: {0}")]
    InvalidFlags(&'static str),
    /// No live lock has this id on this node (-ENOENT).
    #[error("unknown lock {0}")]
    UnknownLock(LkId),
    /// An operation is already in progress on this lock (-EBUSY): wait for its AST, or
    /// cancel it.
    #[error("lock {0} has an operation in progress")]
    Busy(LkId),
    /// Cancel of a lock with no request or conversion in progress (-EBUSY in Linux).
    #[error("lock {0} has nothing to cancel")]
    NothingToCancel(LkId),
}

/// Checks a resource name.
pub(crate) fn check_name(name: &[u8]) -> Result<(), LockError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(LockError::BadName { len: name.len() });
    }
    Ok(())
}

/// Checks the flags of a new request (`validate_lock_args` of the Linux DLM).
pub(crate) fn check_request_flags(mode: Mode, flags: Flags) -> Result<(), LockError> {
    if !Flags::REQUEST_ALLOWED.contains(flags) {
        return Err(LockError::InvalidFlags("a new request takes no CONVERT, QUECVT or CANCEL"));
    }
    check_common_flags(flags)?;
    if flags.contains(Flags::EXPEDITE) && (mode != Mode::NL || flags.contains(Flags::NOQUEUE)) {
        return Err(LockError::InvalidFlags("EXPEDITE is only for new NL requests without NOQUEUE"));
    }
    Ok(())
}

/// Checks the flags of a conversion from `granted` to `mode`.
pub(crate) fn check_convert_flags(granted: Mode, mode: Mode, flags: Flags) -> Result<(), LockError> {
    if !Flags::CONVERT_ALLOWED.contains(flags) {
        return Err(LockError::InvalidFlags("a conversion takes no EXPEDITE or CANCEL"));
    }
    check_common_flags(flags)?;
    if flags.contains(Flags::QUECVT) && !granted.quecvt_allowed(mode) {
        return Err(LockError::InvalidFlags("QUECVT is only for conversions to a higher mode"));
    }
    Ok(())
}

fn check_common_flags(flags: Flags) -> Result<(), LockError> {
    if flags.contains(Flags::ALTPR | Flags::ALTCW) {
        return Err(LockError::InvalidFlags("ALTPR and ALTCW together"));
    }
    if flags.contains(Flags::NOQUEUEBAST) && !flags.contains(Flags::NOQUEUE) {
        return Err(LockError::InvalidFlags("NOQUEUEBAST without NOQUEUE"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_matrix_is_symmetric_and_matches_the_dlm() {
        for a in Mode::ALL {
            for b in Mode::ALL {
                assert_eq!(compatible(a, b), compatible(b, a), "{a} {b}");
            }
        }
        let set = |m: Mode| -> Vec<Mode> { Mode::ALL.into_iter().filter(|o| compatible(m, *o)).collect() };
        use Mode::*;
        assert_eq!(set(NL), vec![NL, CR, CW, PR, PW, EX]);
        assert_eq!(set(CR), vec![NL, CR, CW, PR, PW]);
        assert_eq!(set(CW), vec![NL, CR, CW]);
        assert_eq!(set(PR), vec![NL, CR, PR]);
        assert_eq!(set(PW), vec![NL, CR]);
        assert_eq!(set(EX), vec![NL]);
    }

    #[test]
    fn status_codes_are_linux_values() {
        assert_eq!(Status::Granted.code(), 0);
        assert_eq!(Status::Again.code(), -11);
        assert_eq!(Status::Unlocked.code(), -0x10002);
        assert_eq!(Status::Canceled.code(), -0x10001);
        assert_eq!(Status::Deadlock.code(), -35);
        for s in [Status::Again, Status::Deadlock, Status::Unlocked] {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
    }

    #[test]
    fn lvb_operations_follow_the_dlm_table() {
        use Mode::*;
        // row: granted, column: requested, as dlm_lvb_operations.
        for rq in Mode::ALL {
            assert_eq!(lvb_op(None, rq), LvbOp::Read);
            assert_eq!(lvb_op(Some(EX), rq), LvbOp::Write);
        }
        assert_eq!(lvb_op(Some(PW), EX), LvbOp::Read);
        assert_eq!(lvb_op(Some(PW), PW), LvbOp::Write);
        assert_eq!(lvb_op(Some(PW), NL), LvbOp::Write);
        assert_eq!(lvb_op(Some(PR), PR), LvbOp::Read);
        assert_eq!(lvb_op(Some(PR), CW), LvbOp::Keep);
        assert_eq!(lvb_op(Some(CW), PR), LvbOp::Read);
        assert_eq!(lvb_op(Some(CR), NL), LvbOp::Keep);
        assert_eq!(lvb_op(Some(NL), NL), LvbOp::Read);
    }

    #[test]
    fn flags_print_and_parse() {
        let f = Flags::NOQUEUE | Flags::VALBLK;
        assert_eq!(f.to_string(), "NOQUEUE|VALBLK");
        assert_eq!("noqueue|VALBLK".parse::<Flags>().unwrap(), f);
        assert_eq!("".parse::<Flags>().unwrap(), Flags::empty());
        assert!("BOGUS".parse::<Flags>().is_err());
        assert_eq!(SbFlags::ALTMODE.to_string(), "ALTMODE");
    }

    #[test]
    fn flag_validation() {
        use Mode::*;
        assert!(check_request_flags(EX, Flags::NOQUEUE | Flags::NOQUEUEBAST).is_ok());
        assert!(check_request_flags(EX, Flags::NOQUEUEBAST).is_err());
        assert!(check_request_flags(EX, Flags::CONVERT).is_err());
        assert!(check_request_flags(EX, Flags::QUECVT).is_err());
        assert!(check_request_flags(EX, Flags::EXPEDITE).is_err());
        assert!(check_request_flags(NL, Flags::EXPEDITE).is_ok());
        assert!(check_request_flags(PR, Flags::ALTPR | Flags::ALTCW).is_err());
        assert!(check_convert_flags(NL, EX, Flags::QUECVT).is_ok());
        assert!(check_convert_flags(EX, NL, Flags::QUECVT).is_err());
        assert!(check_convert_flags(PR, CW, Flags::QUECVT).is_ok());
        assert!(check_convert_flags(NL, NL, Flags::EXPEDITE).is_err());
    }
}
