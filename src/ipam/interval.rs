//! A set of `u64` values stored as disjoint closed intervals (`BTreeMap<start, end>`).
//!
//! The allocator keeps its FREE addresses here: the lowest free value is the first interval,
//! and taking or giving back one value splits or merges intervals in O(log n), where n is the
//! number of intervals (never the number of values in the set). The length is a counter.

use std::collections::BTreeMap;

/// A set of `u64` values as disjoint, non-adjacent closed intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntervalSet {
    /// start -> end (inclusive). Invariant: intervals are disjoint and not adjacent
    /// (`end + 1 < next start`), so the representation of a set is unique.
    map: BTreeMap<u64, u64>,
    /// Number of values in the set.
    len: u64,
}

impl IntervalSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of values in the set. O(1).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set holds no value. O(1).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of intervals (the memory cost of the set).
    pub fn interval_count(&self) -> usize {
        self.map.len()
    }

    /// The intervals, in ascending order, as `(start, end)` inclusive.
    pub fn intervals(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// The interval containing `x`, if any.
    fn interval_of(&self, x: u64) -> Option<(u64, u64)> {
        self.map
            .range(..=x)
            .next_back()
            .filter(|&(_, &e)| e >= x)
            .map(|(&s, &e)| (s, e))
    }

    /// Whether `x` is in the set. O(log n).
    pub fn contains(&self, x: u64) -> bool {
        self.interval_of(x).is_some()
    }

    /// The smallest value. O(log n).
    pub fn first(&self) -> Option<u64> {
        self.map.first_key_value().map(|(&s, _)| s)
    }

    /// The smallest value `>= x`. O(log n).
    pub fn first_at_or_after(&self, x: u64) -> Option<u64> {
        if self.interval_of(x).is_some() {
            return Some(x);
        }
        self.map.range(x..).next().map(|(&s, _)| s)
    }

    /// Adds `x`; returns whether it was absent. O(log n).
    pub fn insert(&mut self, x: u64) -> bool {
        if self.contains(x) {
            return false;
        }
        let left = self
            .map
            .range(..x)
            .next_back()
            .filter(|&(_, &e)| e.checked_add(1) == Some(x))
            .map(|(&s, _)| s);
        let right = x
            .checked_add(1)
            .and_then(|n| self.map.get(&n).map(|&e| (n, e)));
        match (left, right) {
            (Some(ls), Some((rs, re))) => {
                self.map.remove(&rs);
                self.map.insert(ls, re);
            }
            (Some(ls), None) => {
                self.map.insert(ls, x);
            }
            (None, Some((rs, re))) => {
                self.map.remove(&rs);
                self.map.insert(x, re);
            }
            (None, None) => {
                self.map.insert(x, x);
            }
        }
        self.len += 1;
        true
    }

    /// Removes `x`; returns whether it was present. O(log n).
    pub fn remove(&mut self, x: u64) -> bool {
        let Some((s, e)) = self.interval_of(x) else {
            return false;
        };
        self.map.remove(&s);
        if s < x {
            self.map.insert(s, x - 1);
        }
        if x < e {
            self.map.insert(x + 1, e);
        }
        self.len -= 1;
        true
    }

    /// Adds every value of `[start, end]` (nothing when `start > end`).
    /// O((k + 1) log n) where k is the number of intervals absorbed.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        if start > end {
            return;
        }
        let (mut new_s, mut new_e) = (start, end);
        // An interval that starts before `start` and overlaps or touches it.
        if let Some((s, e)) = self
            .map
            .range(..start)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| e.saturating_add(1) >= start)
        {
            new_s = s;
            new_e = new_e.max(e);
            self.map.remove(&s);
            self.len -= e - s + 1;
        }
        // Intervals that start inside `[start, end + 1]`.
        let upper = end.saturating_add(1);
        let absorbed: Vec<(u64, u64)> = self
            .map
            .range(start..=upper)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in absorbed {
            new_e = new_e.max(e);
            self.map.remove(&s);
            self.len -= e - s + 1;
        }
        self.map.insert(new_s, new_e);
        self.len += new_e - new_s + 1;
    }

    /// The parts of `[start, end]` that are NOT in the set, in ascending order.
    pub fn gaps_within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        if start > end {
            return gaps;
        }
        let mut cursor = start;
        if let Some((_, e)) = self.interval_of(start) {
            if e >= end {
                return gaps;
            }
            cursor = e + 1;
        }
        for (&s, &e) in self.map.range(cursor..=end) {
            if s > cursor {
                gaps.push((cursor, s - 1));
            }
            if e >= end {
                return gaps;
            }
            cursor = e + 1;
        }
        gaps.push((cursor, end));
        gaps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn set_of(values: &[u64]) -> IntervalSet {
        let mut s = IntervalSet::new();
        for &v in values {
            s.insert(v);
        }
        s
    }

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut s = set_of(&[1, 3]);
        assert_eq!(s.interval_count(), 2);
        assert!(s.insert(2));
        assert!(!s.insert(2));
        assert_eq!(s.intervals().collect::<Vec<_>>(), vec![(1, 3)]);
        assert_eq!(s.len(), 3);
        assert!(s.remove(2));
        assert!(!s.remove(2));
        assert_eq!(s.intervals().collect::<Vec<_>>(), vec![(1, 1), (3, 3)]);
        assert!(s.remove(1));
        assert!(s.remove(3));
        assert!(s.is_empty());
        assert_eq!(s.interval_count(), 0);
    }

    #[test]
    fn first_at_or_after() {
        let mut s = IntervalSet::new();
        s.insert_range(10, 20);
        s.insert_range(30, 40);
        assert_eq!(s.first(), Some(10));
        assert_eq!(s.first_at_or_after(0), Some(10));
        assert_eq!(s.first_at_or_after(15), Some(15));
        assert_eq!(s.first_at_or_after(21), Some(30));
        assert_eq!(s.first_at_or_after(41), None);
    }

    #[test]
    fn insert_range_merges_neighbours() {
        let mut s = IntervalSet::new();
        s.insert_range(10, 20);
        s.insert_range(30, 40);
        s.insert_range(50, 50);
        s.insert_range(21, 29);
        assert_eq!(s.intervals().collect::<Vec<_>>(), vec![(10, 40), (50, 50)]);
        s.insert_range(5, 60);
        assert_eq!(s.intervals().collect::<Vec<_>>(), vec![(5, 60)]);
        assert_eq!(s.len(), 56);
        s.insert_range(9, 3);
        assert_eq!(s.len(), 56);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut s = IntervalSet::new();
        s.insert(u64::MAX);
        s.insert(u64::MAX - 1);
        s.insert(0);
        s.insert_range(u64::MAX - 5, u64::MAX);
        assert_eq!(s.len(), 7);
        assert!(s.remove(u64::MAX));
        assert_eq!(s.gaps_within(0, 3), vec![(1, 3)]);
    }

    #[test]
    fn gaps() {
        let mut s = IntervalSet::new();
        s.insert_range(10, 20);
        s.insert_range(30, 40);
        assert_eq!(s.gaps_within(0, 50), vec![(0, 9), (21, 29), (41, 50)]);
        assert_eq!(s.gaps_within(12, 18), vec![]);
        assert_eq!(s.gaps_within(15, 35), vec![(21, 29)]);
        assert_eq!(s.gaps_within(21, 29), vec![(21, 29)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        InsertRange(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..80).prop_map(Op::Insert),
            (0u64..80).prop_map(Op::Remove),
            (0u64..80, 0u64..10).prop_map(|(a, l)| Op::InsertRange(a, a + l)),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreeset(ops in proptest::collection::vec(op(), 0..60), probe in 0u64..90) {
            let mut s = IntervalSet::new();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(x) => prop_assert_eq!(s.insert(x), model.insert(x)),
                    Op::Remove(x) => prop_assert_eq!(s.remove(x), model.remove(&x)),
                    Op::InsertRange(a, b) => {
                        s.insert_range(a, b);
                        model.extend(a..=b);
                    }
                }
                prop_assert_eq!(s.len(), model.len() as u64);
                prop_assert_eq!(s.first(), model.first().copied());
                let flat: Vec<u64> = s.intervals().flat_map(|(a, b)| a..=b).collect();
                prop_assert_eq!(&flat, &model.iter().copied().collect::<Vec<_>>());
                // non-adjacent, disjoint
                let iv: Vec<_> = s.intervals().collect();
                for w in iv.windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0);
                }
            }
            prop_assert_eq!(s.first_at_or_after(probe), model.range(probe..).next().copied());
            prop_assert_eq!(s.contains(probe), model.contains(&probe));
            let gaps: Vec<u64> = s.gaps_within(probe / 2, probe).into_iter().flat_map(|(a, b)| a..=b).collect();
            let model_gaps: Vec<u64> = (probe / 2..=probe).filter(|x| !model.contains(x)).collect();
            prop_assert_eq!(gaps, model_gaps);
        }
    }
}
