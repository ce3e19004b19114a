//! Glock names, states, holder flags and their mapping to DLM modes and flags (the seed's
//! `make_mode` and `make_flags`).

use std::fmt;

/// The kind of object a glock protects, with GFS2's `LM_TYPE_*` codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GlockType {
    /// Locks that protect no disk object: control, mounted, rename, freeze.
    Nondisk,
    /// A dinode: its metadata, data and cached pages.
    Inode,
    /// A resource group: its header and bitmaps. Carries an LVB.
    Rgrp,
    /// Who has an inode open (the last closer anywhere frees an unlinked inode).
    Iopen,
    /// flock(2) locks.
    Flock,
    /// A journal: its owner holds it EX.
    Journal,
}

impl GlockType {
    /// GFS2's `LM_TYPE_*` code.
    pub fn code(self) -> u32 {
        match self {
            GlockType::Nondisk => 1,
            GlockType::Inode => 2,
            GlockType::Rgrp => 3,
            GlockType::Iopen => 5,
            GlockType::Flock => 6,
            GlockType::Journal => 9,
        }
    }

    /// The type with GFS2 code `code`, if Concord uses it.
    pub fn from_code(code: u32) -> Option<GlockType> {
        Some(match code {
            1 => GlockType::Nondisk,
            2 => GlockType::Inode,
            3 => GlockType::Rgrp,
            5 => GlockType::Iopen,
            6 => GlockType::Flock,
            9 => GlockType::Journal,
            _ => return None,
        })
    }

    /// Whether the DLM lock carries a lock value block (`DLM_LKF_VALBLK` on every
    /// request). Resource groups keep their free counts there (GFS2's rgrplvb).
    pub fn has_lvb(self) -> bool {
        matches!(self, GlockType::Rgrp)
    }
}

/// A glock's name: type and number, as GFS2's `lm_lockname`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GlockName {
    pub ty: GlockType,
    pub number: u64,
}

impl GlockName {
    pub fn new(ty: GlockType, number: u64) -> GlockName {
        GlockName { ty, number }
    }

    /// Parses the dump form `type/hexnumber`, e.g. `2/1a`.
    pub fn parse(text: &str) -> Option<GlockName> {
        let (ty, number) = text.split_once('/')?;
        let ty = GlockType::from_code(ty.parse().ok()?)?;
        Some(GlockName { ty, number: u64::from_str_radix(number, 16).ok()? })
    }
}

/// `type/hexnumber`, as GFS2's glock dump prints `n:`.
impl fmt::Display for GlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:x}", self.ty.code(), self.number)
    }
}

/// A glock state (GFS2's `LM_ST_*`). SH caches clean data and metadata, DF (direct
/// I/O) metadata only, and only EX may hold dirty data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GlState {
    Un,
    Sh,
    Df,
    Ex,
}

impl GlState {
    pub fn as_str(self) -> &'static str {
        match self {
            GlState::Un => "UN",
            GlState::Sh => "SH",
            GlState::Df => "DF",
            GlState::Ex => "EX",
        }
    }

    pub fn parse(text: &str) -> Option<GlState> {
        Some(match text {
            "UN" => GlState::Un,
            "SH" => GlState::Sh,
            "DF" => GlState::Df,
            "EX" => GlState::Ex,
            _ => return None,
        })
    }

    /// Whether two holders in these states may hold the glock at the same time on one
    /// node: SH with SH, DF with DF, EX alone.
    pub fn compatible(self, other: GlState) -> bool {
        matches!((self, other), (GlState::Sh, GlState::Sh) | (GlState::Df, GlState::Df))
    }

    /// The state a glock drops to when a BAST reports a request for `mode` by another
    /// node (lock_dlm's `gdlm_bast`): EX → UN, CW → DF, PR → SH. `None` for NL, which
    /// conflicts with nothing.
    pub fn demote_for(mode: DlmMode) -> Option<GlState> {
        match mode {
            DlmMode::Ex => Some(GlState::Un),
            DlmMode::Cw => Some(GlState::Df),
            DlmMode::Pr => Some(GlState::Sh),
            DlmMode::Nl => None,
        }
    }

    /// The state a DLM mode stands for (the inverse of [`dlm_mode`]).
    pub fn from_dlm(mode: DlmMode) -> GlState {
        match mode {
            DlmMode::Nl => GlState::Un,
            DlmMode::Pr => GlState::Sh,
            DlmMode::Cw => GlState::Df,
            DlmMode::Ex => GlState::Ex,
        }
    }
}

impl fmt::Display for GlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The DLM modes glocks use. The runtime maps them to lockd's `Mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DlmMode {
    Nl,
    Pr,
    Cw,
    Ex,
}

impl DlmMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DlmMode::Nl => "NL",
            DlmMode::Pr => "PR",
            DlmMode::Cw => "CW",
            DlmMode::Ex => "EX",
        }
    }

    pub fn parse(text: &str) -> Option<DlmMode> {
        Some(match text {
            "NL" => DlmMode::Nl,
            "PR" => DlmMode::Pr,
            "CW" => DlmMode::Cw,
            "EX" => DlmMode::Ex,
            _ => return None,
        })
    }
}

impl fmt::Display for DlmMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The DLM mode that holds a glock in `state` (the seed's `make_mode`): UN → NL (the
/// lock stays known to the DLM), SH → PR, DF → CW, EX → EX.
pub fn dlm_mode(state: GlState) -> DlmMode {
    match state {
        GlState::Un => DlmMode::Nl,
        GlState::Sh => DlmMode::Pr,
        GlState::Df => DlmMode::Cw,
        GlState::Ex => DlmMode::Ex,
    }
}

macro_rules! bitset {
    ($(#[$doc:meta])* $name:ident { $($(#[$cdoc:meta])* $c:ident = $v:expr, $s:literal;)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name(pub u32);

        impl $name {
            pub const NONE: $name = $name(0);
            $($(#[$cdoc])* pub const $c: $name = $name($v);)*
            const NAMES: &'static [($name, &'static str)] = &[$(($name::$c, $s)),*];

            pub fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            pub fn intersects(self, other: $name) -> bool {
                self.0 & other.0 != 0
            }

            pub fn is_empty(self) -> bool {
                self.0 == 0
            }

            pub fn insert(&mut self, other: $name) {
                self.0 |= other.0;
            }

            pub fn remove(&mut self, other: $name) {
                self.0 &= !other.0;
            }

            pub fn set(&mut self, other: $name, on: bool) {
                if on {
                    self.insert(other);
                } else {
                    self.remove(other);
                }
            }

            /// Parses `A|B|C` (names as [`Display`](std::fmt::Display) prints them;
            /// `-` or empty for none).
            pub fn parse(text: &str) -> Option<$name> {
                let mut out = $name::NONE;
                for part in text.split('|').filter(|p| !p.is_empty() && *p != "-") {
                    out = out | Self::NAMES.iter().find(|(_, n)| *n == part)?.0;
                }
                Some(out)
            }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl std::ops::BitAnd for $name {
            type Output = $name;
            fn bitand(self, rhs: $name) -> $name {
                $name(self.0 & rhs.0)
            }
        }

        /// `A|B` in declaration order, `-` when empty.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.is_empty() {
                    return f.write_str("-");
                }
                let mut first = true;
                for (flag, name) in Self::NAMES {
                    if self.contains(*flag) {
                        if !first {
                            f.write_str("|")?;
                        }
                        f.write_str(name)?;
                        first = false;
                    }
                }
                Ok(())
            }
        }
    };
}

bitset! {
    /// Flags of one holder's request (GFS2's `LM_FLAG_*` / `GL_*`).
    HolderFlags {
        /// Fail rather than wait behind other nodes (DLM `NOQUEUE`) or behind local
        /// holders.
        TRY = 1 << 0, "TRY";
        /// As TRY, and the holders in the way get one BAST anyway (`NOQUEUEBAST`).
        TRY_1CB = 1 << 1, "TRY_1CB";
        /// SH may be served by DF and DF by SH (DLM `ALTCW` / `ALTPR`), and a cached
        /// state other than UN serves the request.
        ANY = 1 << 2, "ANY";
        /// Goes to the head of the local queue, and to the head of the DLM queue
        /// (`NOORDER|HEADQUE`).
        PRIORITY = 1 << 3, "PRIORITY";
        /// Journal and control locks: served while recovery blocks normal locking.
        NOEXP = 1 << 4, "NOEXP";
        /// Only the requested state will do (no SH under a cached EX).
        EXACT = 1 << 5, "EXACT";
    }
}

bitset! {
    /// A glock's own flags (GFS2's `GLF_*` that the state machine uses).
    GlFlags {
        /// A demote is due: stop granting new holders, demote once the current ones
        /// leave.
        DEMOTE = 1 << 0, "DEMOTE";
        /// A demote was asked for but waits for the minimum hold time.
        PENDING_DEMOTE = 1 << 1, "PENDING_DEMOTE";
        /// The demote's sync, invalidate and conversion are under way.
        DEMOTE_IN_PROGRESS = 1 << 2, "DEMOTE_IN_PROGRESS";
        /// The current request may wait behind other nodes (counted in `srttb`,
        /// sent with `QUECVT` when a conversion).
        BLOCKING = 1 << 3, "BLOCKING";
        /// The DLM has granted this lock once, so it has a lock id and later requests
        /// are conversions (GFS2's `GLF_INITIAL`).
        INITIAL = 1 << 4, "INITIAL";
        /// A cancel was sent for the request in flight.
        CANCELING = 1 << 5, "CANCELING";
        /// To be dropped (DLM unlock) once idle and unlocked.
        EVICT = 1 << 6, "EVICT";
    }
}

bitset! {
    /// DLM request flags (`DLM_LKF_*`), only those glocks use.
    DlmFlags {
        NOQUEUE = 1 << 0, "NOQUEUE";
        NOQUEUEBAST = 1 << 1, "NOQUEUEBAST";
        NOORDER = 1 << 2, "NOORDER";
        HEADQUE = 1 << 3, "HEADQUE";
        ALTPR = 1 << 4, "ALTPR";
        ALTCW = 1 << 5, "ALTCW";
        CONVERT = 1 << 6, "CONVERT";
        QUECVT = 1 << 7, "QUECVT";
        VALBLK = 1 << 8, "VALBLK";
    }
}

/// The DLM flags of a request for `to` (the seed's `make_flags`).
///
/// * `lvb`: the lock carries a value block (`VALBLK`).
/// * `flags`: the holder flags the request is made for (none for a demote).
/// * `has_lkid`: the DLM already knows the lock (it was granted once), so this is a
///   conversion (`CONVERT`).
/// * `blocking`: the request may wait behind other nodes' locks (GFS2's
///   `GLF_BLOCKING`: not a TRY, not to UN, not from EX); a blocking conversion goes to
///   the end of the convert queue (`QUECVT`) rather than being granted in place ahead
///   of earlier waiters.
pub fn make_flags(lvb: bool, flags: HolderFlags, to: DlmMode, has_lkid: bool, blocking: bool) -> DlmFlags {
    let mut lkf = DlmFlags::NONE;
    if lvb {
        lkf = lkf | DlmFlags::VALBLK;
    }
    if flags.contains(HolderFlags::TRY) {
        lkf = lkf | DlmFlags::NOQUEUE;
    }
    if flags.contains(HolderFlags::TRY_1CB) {
        lkf = lkf | DlmFlags::NOQUEUE | DlmFlags::NOQUEUEBAST;
    }
    if flags.contains(HolderFlags::PRIORITY) {
        lkf = lkf | DlmFlags::NOORDER | DlmFlags::HEADQUE;
    }
    if flags.contains(HolderFlags::ANY) {
        // The alternate of PR is CW and of CW is PR; ANY means nothing for NL or EX.
        match to {
            DlmMode::Pr => lkf = lkf | DlmFlags::ALTCW,
            DlmMode::Cw => lkf = lkf | DlmFlags::ALTPR,
            DlmMode::Nl | DlmMode::Ex => {}
        }
    }
    if has_lkid {
        lkf = lkf | DlmFlags::CONVERT;
        if blocking {
            lkf = lkf | DlmFlags::QUECVT;
        }
    }
    lkf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_round_trips_through_dump_form() {
        let n = GlockName::new(GlockType::Inode, 0x1a);
        assert_eq!(n.to_string(), "2/1a");
        assert_eq!(GlockName::parse("2/1a"), Some(n));
        assert_eq!(GlockName::parse("4/1"), None);
    }

    #[test]
    fn make_flags_follows_lock_dlm() {
        let f = |h, to, lkid, blocking| make_flags(false, h, to, lkid, blocking).to_string();
        assert_eq!(f(HolderFlags::TRY, DlmMode::Ex, false, false), "NOQUEUE");
        assert_eq!(f(HolderFlags::TRY_1CB, DlmMode::Ex, false, false), "NOQUEUE|NOQUEUEBAST");
        assert_eq!(f(HolderFlags::PRIORITY, DlmMode::Ex, false, true), "NOORDER|HEADQUE");
        assert_eq!(f(HolderFlags::ANY, DlmMode::Pr, false, true), "ALTCW");
        assert_eq!(f(HolderFlags::ANY, DlmMode::Cw, false, true), "ALTPR");
        assert_eq!(f(HolderFlags::NONE, DlmMode::Ex, true, true), "CONVERT|QUECVT");
        assert_eq!(f(HolderFlags::NONE, DlmMode::Nl, true, false), "CONVERT");
        assert_eq!(make_flags(true, HolderFlags::NONE, DlmMode::Ex, false, true).to_string(), "VALBLK");
        assert_eq!(HolderFlags::parse("TRY|ANY"), Some(HolderFlags::TRY | HolderFlags::ANY));
        assert_eq!(HolderFlags::parse("BOGUS"), None);
    }
}
