//! Per-glock locking statistics, as GFS2's `gfs2_lkstats` (lock_dlm.c
//! `gfs2_update_stats`, shown in debugfs `glstats`).
//!
//! Times are kept in nanoseconds like GFS2's, although the caller's clock ticks in
//! milliseconds: a sample is a whole number of milliseconds, the smoothing keeps the
//! fractions.

/// Smoothed round-trip and inter-request times of one glock's DLM requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlockStats {
    /// Smoothed round-trip time of non-blocking requests (to UN, from EX, or TRY) and
    /// its variance.
    pub srtt_ns: i64,
    pub srttvar_ns: i64,
    /// The same for requests that may block behind other nodes.
    pub srttb_ns: i64,
    pub srttvarb_ns: i64,
    /// Smoothed time between two DLM requests for this glock and its variance.
    pub sirt_ns: i64,
    pub sirtvar_ns: i64,
    /// DLM requests sent (conversions and unlocks).
    pub dcount: u64,
    /// Holders queued (every `acquire`; `try_cached` is not counted, as GFS2's
    /// `GL_NOBLOCK`).
    pub qcount: u64,
    /// Callbacks (BASTs) received: how often another node asked for this glock.
    pub bcount: u64,
    /// Demote rounds that lent the glock back to local waiters because the kernel had
    /// not confirmed the invalidation ([`crate::glock::Glocks::inval_unconfirmed`]).
    pub lends: u64,
    /// Conversions sent although the kernel had not confirmed the invalidation before
    /// them: another node may act while this node's kernel still shows the old state.
    pub late_invals: u64,
}

/// Adds `sample` to a mean/variance pair: the mean moves 1/8 of the way to the sample,
/// the variance 1/4 of the way to the sample's distance from the old mean (TCP/IP
/// Illustrated vol. 2, as GFS2).
fn update(mean: &mut i64, var: &mut i64, sample: i64) {
    let delta = sample - *mean;
    *mean += delta >> 3;
    *var += (delta.abs() - *var) >> 2;
}

impl GlockStats {
    /// A DLM reply arrived `rtt_ms` after its request was sent.
    pub(crate) fn reply(&mut self, rtt_ms: u64, blocking: bool) {
        let sample = ms_to_ns(rtt_ms);
        if blocking {
            update(&mut self.srttb_ns, &mut self.srttvarb_ns, sample);
        } else {
            update(&mut self.srtt_ns, &mut self.srttvar_ns, sample);
        }
    }

    /// A DLM request is sent `irt_ms` after the previous one.
    pub(crate) fn request(&mut self, irt_ms: u64) {
        update(&mut self.sirt_ns, &mut self.sirtvar_ns, ms_to_ns(irt_ms));
    }
}

fn ms_to_ns(ms: u64) -> i64 {
    i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_moves_an_eighth_and_a_quarter() {
        let mut s = GlockStats::default();
        s.reply(8, false);
        assert_eq!((s.srtt_ns, s.srttvar_ns), (1_000_000, 2_000_000));
        s.reply(8, true);
        assert_eq!((s.srttb_ns, s.srttvarb_ns), (1_000_000, 2_000_000));
        s.request(16);
        assert_eq!((s.sirt_ns, s.sirtvar_ns), (2_000_000, 4_000_000));
    }
}
