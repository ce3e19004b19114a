//! The POSIX range algebra of one owner's locks on one resource (`fs/locks.c`'s
//! `posix_lock_inode` without the conflict part).
//!
//! A [`RangeSet`] is a sorted list of disjoint inclusive ranges, each a read or a
//! write lock. Setting a lock replaces whatever the owner held on its bytes (of either
//! type) and merges it with the owner's locks of the same type that overlap or touch
//! it (`a.end + 1 == b.start`), as Linux does; unlocking splits a lock that straddles
//! the unlocked range. Locks of different types never merge.
//!
//! An end at or above [`EOF`] (FUSE's `OFFSET_MAX`, `i64::MAX`, or `u64::MAX`)
//! means "to the end of the file": the algebra compares such ends as equal (see
//! [`eff_end`]) but keeps the value the caller gave, so that F_GETLK reports it back
//! unchanged.

/// Ends at or above this mean "to the end of the file".
pub const EOF: u64 = i64::MAX as u64;

/// The end used for comparisons: every end at or past [`EOF`] is `u64::MAX`.
pub fn eff_end(end: u64) -> u64 {
    if end >= EOF {
        u64::MAX
    } else {
        end
    }
}

/// True if `a_start..=a_end` and `b_start..=b_end` share a byte.
pub fn overlaps(a_start: u64, a_end: u64, b_start: u64, b_end: u64) -> bool {
    a_start <= eff_end(b_end) && b_start <= eff_end(a_end)
}

/// One lock of an owner: `start..=end`, read or write, and the pid that set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub write: bool,
    /// The pid given by the lock request that last set a byte of this range.
    pub pid: u32,
}

impl Range {
    fn eff_end(&self) -> u64 {
        eff_end(self.end)
    }
}

/// One owner's locks on one resource: sorted by start, disjoint, and no two locks of
/// the same type touch (they would have been merged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet { ranges: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range> + '_ {
        self.ranges.iter()
    }

    /// The locks sharing a byte with `start..=end`, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Range> + '_ {
        self.ranges.iter().filter(move |r| overlaps(r.start, r.end, start, end))
    }

    /// True if the owner holds every byte of `start..=end` with a lock of type `write`.
    pub fn covers(&self, start: u64, end: u64, write: bool) -> bool {
        let end = eff_end(end);
        let mut next = start;
        for r in &self.ranges {
            if r.eff_end() < next {
                continue;
            }
            if r.start > next || r.write != write {
                return false;
            }
            if r.eff_end() >= end {
                return true;
            }
            next = r.eff_end() + 1;
        }
        false
    }

    /// Sets a lock on `start..=end`: the owner's locks on those bytes are replaced;
    /// same-type locks that overlap or touch it are merged into it. A range with
    /// `start > end` is ignored (the caller checks).
    pub fn set(&mut self, start: u64, end: u64, write: bool, pid: u32) {
        if start > eff_end(end) {
            return;
        }
        self.unlock(start, end);
        let mut new = Range { start, end, write, pid };
        // Merge with same-type neighbours that touch it (nothing overlaps any more).
        let i = self.ranges.partition_point(|r| r.start < start);
        if i < self.ranges.len() {
            let next = self.ranges[i];
            if next.write == write && new.eff_end() != u64::MAX && new.eff_end() + 1 == next.start {
                new.end = next.end;
                self.ranges.remove(i);
            }
        }
        let mut at = i;
        if i > 0 {
            let prev = self.ranges[i - 1];
            if prev.write == write && prev.eff_end() != u64::MAX && prev.eff_end() + 1 == new.start {
                new.start = prev.start;
                self.ranges.remove(i - 1);
                at = i - 1;
            }
        }
        self.ranges.insert(at, new);
    }

    /// Removes the owner's locks on `start..=end`, splitting one that straddles an
    /// edge. Returns true if anything changed.
    pub fn unlock(&mut self, start: u64, end: u64) -> bool {
        let end_e = eff_end(end);
        if start > end_e {
            return false;
        }
        let mut changed = false;
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for r in self.ranges.drain(..) {
            if !overlaps(r.start, r.end, start, end) {
                out.push(r);
                continue;
            }
            changed = true;
            if r.start < start {
                out.push(Range { end: start - 1, ..r });
            }
            if r.eff_end() > end_e {
                // end_e < r.eff_end() <= u64::MAX: no overflow.
                out.push(Range { start: end_e + 1, ..r });
            }
        }
        self.ranges = out;
        changed
    }

    /// Inserts a lock as reported by its holder during recovery, without any
    /// merging beyond what [`set`](Self::set) does.
    pub fn insert_reported(&mut self, r: Range) {
        self.set(r.start, r.end, r.write, r.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn show(s: &RangeSet) -> Vec<(u64, u64, char)> {
        s.iter().map(|r| (r.start, r.end, if r.write { 'w' } else { 'r' })).collect()
    }

    #[test]
    fn unlock_in_the_middle_splits_a_lock() {
        let mut s = RangeSet::new();
        s.set(0, 99, true, 1);
        assert!(s.unlock(10, 19));
        assert_eq!(show(&s), vec![(0, 9, 'w'), (20, 99, 'w')]);
        assert!(!s.unlock(10, 19), "nothing left there");
    }

    #[test]
    fn adjacent_and_overlapping_same_type_locks_merge() {
        let mut s = RangeSet::new();
        s.set(0, 9, false, 1);
        s.set(10, 19, false, 1);
        assert_eq!(show(&s), vec![(0, 19, 'r')]);
        s.set(15, 30, false, 2);
        assert_eq!(show(&s), vec![(0, 30, 'r')]);
        assert_eq!(s.iter().next().unwrap().pid, 2, "the merged lock takes the newest pid");
        s.set(40, 49, false, 1);
        s.set(31, 39, false, 1);
        assert_eq!(show(&s), vec![(0, 49, 'r')], "filling the gap merges both sides");
    }

    #[test]
    fn different_types_do_not_merge_and_a_set_replaces_the_other_type() {
        let mut s = RangeSet::new();
        s.set(0, 9, false, 1);
        s.set(10, 19, true, 1);
        assert_eq!(show(&s), vec![(0, 9, 'r'), (10, 19, 'w')]);
        s.set(5, 14, true, 1);
        assert_eq!(show(&s), vec![(0, 4, 'r'), (5, 19, 'w')]);
        s.set(8, 8, false, 1);
        assert_eq!(show(&s), vec![(0, 4, 'r'), (5, 7, 'w'), (8, 8, 'r'), (9, 19, 'w')]);
    }

    #[test]
    fn eof_ends_compare_equal_and_are_kept_as_given() {
        let mut s = RangeSet::new();
        s.set(10, EOF, true, 1);
        assert!(s.covers(10, u64::MAX, true));
        s.unlock(20, u64::MAX);
        assert_eq!(show(&s), vec![(10, 19, 'w')]);
        s.set(0, u64::MAX, false, 1);
        s.unlock(5, EOF);
        assert_eq!(show(&s), vec![(0, 4, 'r')], "no lock left past EOF");
        s.set(100, EOF, false, 1);
        s.set(50, u64::MAX, false, 1);
        assert_eq!(show(&s), vec![(0, 4, 'r'), (50, u64::MAX, 'r')]);
        assert!(overlaps(0, EOF, u64::MAX - 1, u64::MAX));
    }

    #[test]
    fn a_lock_at_the_very_end_does_not_overflow() {
        let mut s = RangeSet::new();
        s.set(u64::MAX, u64::MAX, true, 1);
        s.set(0, u64::MAX, true, 1);
        assert_eq!(show(&s), vec![(0, u64::MAX, 'w')]);
        s.unlock(0, 0);
        assert_eq!(show(&s), vec![(1, u64::MAX, 'w')]);
    }

    /// The model: one cell per byte of a 32-byte file plus one "past the end" cell
    /// standing for every byte from 32 on (reached only by ranges to EOF).
    const CELLS: usize = 33;
    type Model = [Option<(bool, u32)>; CELLS];

    fn cells(start: u64, end: u64) -> std::ops::RangeInclusive<usize> {
        start as usize..=(eff_end(end).min(CELLS as u64 - 1)) as usize
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u64, u64, bool, u32),
        Unlock(u64, u64),
    }

    fn end_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![4 => 0u64..32, 1 => Just(EOF), 1 => Just(u64::MAX)]
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..32, end_strategy(), any::<bool>(), 1u32..4).prop_map(|(s, e, w, p)| Op::Set(s, e, w, p)),
            (0u64..32, end_strategy()).prop_map(|(s, e)| Op::Unlock(s, e)),
        ]
    }

    proptest! {
        #[test]
        fn range_set_matches_a_byte_array_model(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            let mut s = RangeSet::new();
            let mut m: Model = [None; CELLS];
            for op in &ops {
                match *op {
                    Op::Set(a, b, w, p) => {
                        if a > eff_end(b) {
                            continue;
                        }
                        s.set(a, b, w, p);
                        for c in cells(a, b) {
                            m[c] = Some((w, p));
                        }
                    }
                    Op::Unlock(a, b) => {
                        if a > eff_end(b) {
                            continue;
                        }
                        s.unlock(a, b);
                        for c in cells(a, b) {
                            m[c] = None;
                        }
                    }
                }
                // Same bytes locked with the same types.
                let mut from_set: Model = [None; CELLS];
                for r in s.iter() {
                    for c in cells(r.start, r.end) {
                        prop_assert!(from_set[c].is_none(), "ranges overlap: {:?}", s);
                        from_set[c] = Some((r.write, 0));
                    }
                }
                let types = |m: &Model| m.iter().map(|c| c.map(|(w, _)| w)).collect::<Vec<_>>();
                prop_assert_eq!(types(&from_set), types(&m), "after {:?}: {:?}", op, s);
                // Sorted, and fully merged: no two same-type ranges touch.
                for w in s.ranges.windows(2) {
                    prop_assert!(w[0].eff_end() < w[1].start, "unsorted or overlapping: {:?}", s);
                    prop_assert!(!(w[0].write == w[1].write && w[0].eff_end() + 1 == w[1].start), "not merged: {:?}", s);
                }
                // covers() agrees with the model on a few ranges.
                for (a, b) in [(0u64, 31u64), (3, 9), (31, EOF)] {
                    for w in [false, true] {
                        let model = cells(a, b).all(|c| m[c].map(|(t, _)| t) == Some(w));
                        prop_assert_eq!(s.covers(a, b, w), model, "covers({}, {}, {})", a, b, w);
                    }
                }
            }
        }
    }
}
