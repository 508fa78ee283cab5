//! Per-pool allocation state: which addresses exist as IPAddress objects (`known`), which are
//! in flight in this process (`reserved`), and the FREE addresses as an interval set, so that
//! every operation costs O(log n) whatever the pool's size and fill (no scan of used addresses).
//!
//! Free addresses are keyed by `(range index << 32) | ip` (see `Pool::slot`), so the smallest key
//! is "the first free address of the first range (declaration order) that has one", even when
//! ranges are declared out of numeric order.
//!
//! Counters: `free()` = allocatable addresses neither known nor reserved; `used()` = allocatable
//! addresses known or reserved; `used() + free() == pool.size()`. Pre-allocated addresses, the
//! gateway, network/broadcast and addresses outside the pool are not allocatable: they are
//! remembered in `known`/`reserved` but never counted.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use rand::Rng;

use super::interval::IntervalSet;
use super::pool::{Pool, Strategy, slot_ip};

/// No free address left in a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IPPool {pool} has no free address ({size} addresses, all in use)")]
pub struct Exhausted {
    /// `namespace/name`.
    pub pool: String,
    /// [`Pool::size`].
    pub size: usize,
}

/// Why [`PoolState::reserve`] gave no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The pool is full: try the next candidate pool.
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    /// The claim's `preAllocations` address is the gateway, network or broadcast address: it
    /// must not be configured on a machine. Do not try another pool (the claim is pinned).
    #[error(
        "IPPool {pool}: spec.preAllocations[{claim}] {ip} is {reason}; it cannot be given to a machine"
    )]
    UnusablePreAllocation {
        pool: String,
        claim: String,
        ip: Ipv4Addr,
        reason: String,
    },
}

impl AllocError {
    /// Whether the pool is full (overflow to the next candidate pool).
    pub fn is_exhausted(&self) -> bool {
        matches!(self, AllocError::Exhausted(_))
    }
}

/// Allocation state of one pool.
#[derive(Debug, Clone)]
pub struct PoolState {
    pool: Pool,
    /// Addresses that exist as IPAddress objects (watch cache, or learned from a 409).
    known: HashSet<u32>,
    /// Addresses handed out by [`PoolState::reserve`] and not yet committed or given back.
    reserved: HashSet<u32>,
    /// Addresses that a live machine's device carries in `ipAddrs`, with or without an
    /// IPAddress object: never offered (a pool re-created empty, a claim lost by hand).
    carried: HashSet<u32>,
    /// Allocatable addresses neither known nor reserved, as slot keys.
    free: IntervalSet,
}

impl PoolState {
    /// State of `pool` given the addresses that already exist. O(k log n) for k known addresses.
    pub fn new(pool: Pool, known: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        let mut state = PoolState {
            free: pool.allocatable().clone(),
            pool,
            known: known.into_iter().map(u32::from).collect(),
            reserved: HashSet::new(),
            carried: HashSet::new(),
        };
        state.remove_taken_from_free();
        state
    }

    fn remove_taken_from_free(&mut self) {
        for &raw in self
            .known
            .iter()
            .chain(self.reserved.iter())
            .chain(self.carried.iter())
        {
            if let Some(slot) = self.pool.slot(Ipv4Addr::from(raw)) {
                self.free.remove(slot);
            }
        }
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The pool's spec changed: rebuild the free set from the new pool, keeping what is known and
    /// reserved. O(k log n); rare.
    pub fn replace_pool(&mut self, pool: Pool) {
        self.free = pool.allocatable().clone();
        self.pool = pool;
        self.remove_taken_from_free();
    }

    /// An IPAddress with this address exists (watch add, or a create returned 409). Idempotent.
    pub fn observe_used(&mut self, ip: Ipv4Addr) {
        self.known.insert(u32::from(ip));
        if let Some(slot) = self.pool.slot(ip) {
            self.free.remove(slot);
        }
    }

    /// Whether a live machine carries this address: a carried address is never offered, even
    /// without an IPAddress object. Idempotent.
    pub fn observe_carried(&mut self, ip: Ipv4Addr, carried: bool) {
        let raw = u32::from(ip);
        if carried {
            // Only addresses of this pool's address space are kept.
            if let Some(slot) = self.pool.slot(ip) {
                self.carried.insert(raw);
                self.free.remove(slot);
            }
        } else if self.carried.remove(&raw) {
            self.free_if_unused(ip);
        }
    }

    /// The IPAddress with this address was deleted: free again unless reserved here or not
    /// allocatable. Idempotent.
    pub fn observe_released(&mut self, ip: Ipv4Addr) {
        self.known.remove(&u32::from(ip));
        self.free_if_unused(ip);
    }

    fn free_if_unused(&mut self, ip: Ipv4Addr) {
        let raw = u32::from(ip);
        if self.known.contains(&raw) || self.reserved.contains(&raw) || self.carried.contains(&raw)
        {
            return;
        }
        if let Some(slot) = self.pool.slot(ip)
            && self.pool.allocatable().contains(slot)
        {
            self.free.insert(slot);
        }
    }

    /// Takes an address for `claim_name` and marks it reserved.
    ///
    /// - `preAllocations[claim_name]`, when present, is returned as is (it is never in the free
    ///   set), even when it is known or reserved: the apiserver's 409 on the IPAddress name
    ///   arbitrates, and it may be this claim's own address. An error when it is the gateway,
    ///   network or broadcast address.
    /// - sequential: the lowest free address, ranges in declaration order. O(log n).
    /// - random: a random offset in the pool's address space, then the first free address at or
    ///   after it (wrapping). O(log n). Not exactly uniform: a free address right after a long
    ///   run of used or excluded addresses is more likely to be picked.
    pub fn reserve(
        &mut self,
        claim_name: &str,
        rng: &mut impl Rng,
    ) -> Result<Ipv4Addr, AllocError> {
        let ip = match self.pre_allocated(claim_name)? {
            Some(ip) => ip,
            None => {
                let slot = match self.pool.strategy {
                    Strategy::Sequential => self.free.first(),
                    Strategy::Random => self.random_slot(rng),
                }
                .ok_or_else(|| self.exhausted())?;
                self.free.remove(slot);
                slot_ip(slot)
            }
        };
        self.reserved.insert(u32::from(ip));
        Ok(ip)
    }

    /// What a sequential [`PoolState::reserve`] would return, without changing anything, skipping
    /// `skip` (addresses chosen for other devices of the same request). For dry runs; with the
    /// random strategy this is still the lowest free address. `None` when the pool is full or the
    /// claim's pre-allocation is unusable (see [`PoolState::try_peek`] for which).
    /// O((|skip| + 1) log n).
    pub fn peek(&self, claim_name: &str, skip: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        self.try_peek(claim_name, skip).ok()
    }

    /// [`PoolState::peek`] with the reason when there is no address.
    pub fn try_peek(&self, claim_name: &str, skip: &[Ipv4Addr]) -> Result<Ipv4Addr, AllocError> {
        if let Some(ip) = self.pre_allocated(claim_name)? {
            return Ok(ip);
        }
        let mut cursor = self.free.first();
        while let Some(slot) = cursor {
            let ip = slot_ip(slot);
            if !skip.contains(&ip) {
                return Ok(ip);
            }
            cursor = slot
                .checked_add(1)
                .and_then(|n| self.free.first_at_or_after(n));
        }
        Err(self.exhausted().into())
    }

    fn pre_allocated(&self, claim_name: &str) -> Result<Option<Ipv4Addr>, AllocError> {
        let Some(ip) = self.pool.pre_allocation(claim_name) else {
            return Ok(None);
        };
        match self.pool.unusable_reason(ip) {
            None => Ok(Some(ip)),
            Some(reason) => Err(AllocError::UnusablePreAllocation {
                pool: self.pool.key(),
                claim: claim_name.to_string(),
                ip,
                reason,
            }),
        }
    }

    fn random_slot(&self, rng: &mut impl Rng) -> Option<u64> {
        if self.free.is_empty() {
            return None;
        }
        let span = self.pool.span();
        let start = self.pool.slot_at_offset(rng.random_range(0..span))?;
        self.free
            .first_at_or_after(start)
            .or_else(|| self.free.first())
    }

    fn exhausted(&self) -> Exhausted {
        Exhausted {
            pool: self.pool.key(),
            size: self.pool.size(),
        }
    }

    /// Gives a reserved address back (the create failed or the request was denied): free again
    /// unless it is known.
    pub fn unreserve(&mut self, ip: Ipv4Addr) {
        self.reserved.remove(&u32::from(ip));
        self.free_if_unused(ip);
    }

    /// The IPAddress of a reserved address was created: reserved -> known.
    pub fn commit(&mut self, ip: Ipv4Addr) {
        let raw = u32::from(ip);
        self.reserved.remove(&raw);
        self.known.insert(raw);
        if let Some(slot) = self.pool.slot(ip) {
            self.free.remove(slot);
        }
    }

    /// Whether an IPAddress with this address is known to exist.
    pub fn is_known(&self, ip: Ipv4Addr) -> bool {
        self.known.contains(&u32::from(ip))
    }

    /// Whether this address is reserved in this process.
    pub fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        self.reserved.contains(&u32::from(ip))
    }

    /// Whether `ip` would be handed out by a sequential or random reserve.
    pub fn is_free(&self, ip: Ipv4Addr) -> bool {
        self.pool.slot(ip).is_some_and(|s| self.free.contains(s))
    }

    /// Allocatable addresses that are known or reserved. O(1).
    pub fn used(&self) -> usize {
        self.pool.size() - self.free()
    }

    /// Allocatable addresses neither known nor reserved. O(1).
    pub fn free(&self) -> usize {
        usize::try_from(self.free.len()).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::pool::{PoolInput, RangeInput, parse_pool};
    use proptest::prelude::*;
    use proptest::strategy::Strategy;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::{BTreeMap, BTreeSet};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn pool(ranges: &[(&str, &str)], pre: &[(&str, &str)], strategy: &str) -> Pool {
        parse_pool(&PoolInput {
            namespace: "ns".into(),
            name: "p".into(),
            name_prefix: "p".into(),
            ranges: ranges
                .iter()
                .map(|(s, e)| RangeInput {
                    start: Some(s.to_string()),
                    end: Some(e.to_string()),
                    ..Default::default()
                })
                .collect(),
            prefix: Some(24),
            gateway: Some("10.0.0.1".into()),
            pre_allocations: pre
                .iter()
                .map(|(c, a)| (c.to_string(), a.to_string()))
                .collect(),
            allocation_strategy: Some(strategy.into()),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn sequential_in_declaration_order() {
        let p = pool(
            &[("10.0.0.200", "10.0.0.201"), ("10.0.0.1", "10.0.0.4")],
            &[("pinned", "10.0.0.2")],
            "sequential",
        );
        let mut s = PoolState::new(p, [ip("10.0.0.201")]);
        let rng = &mut StdRng::seed_from_u64(1);
        assert_eq!((s.used(), s.free()), (1, 3)); // .200 .201 .3 .4 (gw .1, pinned .2)
        assert_eq!(s.peek("x", &[]), Some(ip("10.0.0.200")));
        assert_eq!(s.peek("x", &[ip("10.0.0.200")]), Some(ip("10.0.0.3")));
        assert_eq!(s.reserve("a", rng), Ok(ip("10.0.0.200")));
        assert_eq!(s.reserve("pinned", rng), Ok(ip("10.0.0.2")));
        assert_eq!(s.reserve("b", rng), Ok(ip("10.0.0.3")));
        assert_eq!(s.reserve("c", rng), Ok(ip("10.0.0.4")));
        let err = s.reserve("d", rng).unwrap_err();
        assert!(err.is_exhausted());
        assert_eq!(
            err.to_string(),
            "IPPool ns/p has no free address (4 addresses, all in use)"
        );
        assert_eq!(s.try_peek("d", &[]), Err(err));
        assert_eq!(s.peek("d", &[]), None);
        assert_eq!((s.used(), s.free()), (4, 0));
        s.unreserve(ip("10.0.0.3"));
        s.commit(ip("10.0.0.4"));
        assert!(s.is_known(ip("10.0.0.4")));
        assert_eq!(s.reserve("d", rng), Ok(ip("10.0.0.3")));
        s.observe_released(ip("10.0.0.201"));
        assert_eq!(s.reserve("e", rng), Ok(ip("10.0.0.201")));
        // the pinned address never goes back to the free set
        s.unreserve(ip("10.0.0.2"));
        assert!(!s.is_free(ip("10.0.0.2")));
        assert_eq!((s.used(), s.free()), (4, 0));
    }

    #[test]
    fn idempotent_observations_and_outside_addresses() {
        let p = pool(&[("10.0.0.10", "10.0.0.19")], &[], "sequential");
        let mut s = PoolState::new(p, []);
        s.observe_used(ip("10.0.0.10"));
        s.observe_used(ip("10.0.0.10"));
        s.observe_used(ip("192.168.0.1"));
        s.observe_used(ip("10.0.0.1")); // gateway, outside the range anyway
        assert_eq!((s.used(), s.free()), (1, 9));
        assert!(s.is_known(ip("192.168.0.1")));
        s.observe_released(ip("10.0.0.10"));
        s.observe_released(ip("10.0.0.10"));
        s.observe_released(ip("192.168.0.1"));
        assert_eq!((s.used(), s.free()), (0, 10));
    }

    #[test]
    fn replace_pool_keeps_known_and_reserved() {
        let mut s = PoolState::new(
            pool(&[("10.0.0.10", "10.0.0.12")], &[], "sequential"),
            [ip("10.0.0.10"), ip("10.0.0.50")],
        );
        let rng = &mut StdRng::seed_from_u64(1);
        assert_eq!(s.reserve("a", rng), Ok(ip("10.0.0.11")));
        s.replace_pool(pool(&[("10.0.0.10", "10.0.0.60")], &[], "sequential"));
        assert_eq!(s.used(), 3); // .10 known, .11 reserved, .50 known
        assert_eq!(s.free(), 51 - 3);
        assert_eq!(s.reserve("b", rng), Ok(ip("10.0.0.12")));
    }

    #[test]
    fn unusable_pre_allocation() {
        let p = pool(
            &[("10.0.0.1", "10.0.0.20")],
            &[("claim-0", "10.0.0.1")],
            "sequential",
        );
        let mut s = PoolState::new(p, []);
        let rng = &mut StdRng::seed_from_u64(1);
        let err = s.reserve("claim-0", rng).unwrap_err();
        assert!(!err.is_exhausted());
        assert_eq!(
            err.to_string(),
            "IPPool ns/p: spec.preAllocations[claim-0] 10.0.0.1 is a gateway; it cannot be given to a machine"
        );
    }

    #[test]
    fn random_covers_the_pool() {
        let p = pool(
            &[("10.0.0.10", "10.0.0.19"), ("10.0.0.100", "10.0.0.104")],
            &[],
            "random",
        );
        let mut s = PoolState::new(p, []);
        let rng = &mut StdRng::seed_from_u64(7);
        let mut got = BTreeSet::new();
        for _ in 0..15 {
            assert!(got.insert(s.reserve("x", rng).unwrap()));
        }
        assert!(s.reserve("x", rng).unwrap_err().is_exhausted());
        // gives back and re-draws: not always the lowest
        for a in got.clone() {
            s.unreserve(a);
        }
        let firsts: BTreeSet<_> = (0..20)
            .map(|_| {
                let a = s.reserve("x", rng).unwrap();
                s.unreserve(a);
                a
            })
            .collect();
        assert!(firsts.len() > 3, "{firsts:?}");
    }

    /// A /16 with 60,000 addresses in use and thousands of free holes (the micro-benchmark case;
    /// no timing here: DESIGN.md keeps timings in benchmarks).
    #[test]
    fn big_pool_with_60k_used() {
        let p = parse_pool(&PoolInput {
            namespace: "ns".into(),
            name: "big".into(),
            name_prefix: "big".into(),
            ranges: vec![RangeInput {
                subnet: Some("10.1.0.0/16".into()),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        let rng = &mut StdRng::seed_from_u64(3);
        // 11 of every 12 addresses used: about 60,000 used, 5,000 free intervals
        let used = (1..65_535u32)
            .filter(|i| i % 12 != 0)
            .map(|i| Ipv4Addr::from(u32::from(ip("10.1.0.0")) + i));
        let mut s = PoolState::new(p, used);
        assert!(s.used() > 60_000, "{}", s.used());
        let free = s.free();
        assert_eq!(s.used() + free, s.pool().size());
        // sequential: the first hole is 10.1.0.12
        assert_eq!(s.peek("x", &[]), Some(ip("10.1.0.12")));
        for _ in 0..1000 {
            let a = s.reserve("x", rng).unwrap();
            assert!(!s.is_known(a));
            s.unreserve(a);
            s.observe_used(a);
            s.observe_released(a);
        }
        assert_eq!(s.free(), free);
    }

    // ---- property test against a naive model ----

    const BASE: u32 = 0x0a00_0000; // 10.0.0.0/20

    #[derive(Debug, Clone)]
    struct GenRange {
        first: u32,
        last: u32,
        prefix: u8,
        gateway: Option<u32>,
    }

    fn gen_range() -> impl Strategy<Value = GenRange> {
        (
            prop::sample::select(vec![20u8, 24, 26, 28, 29, 30, 31, 32]),
            any::<u32>(),
            0u32..64,
            0u32..64,
            prop::option::of(0u32..4096),
        )
            .prop_map(|(prefix, block, a, len, gw)| {
                let size = 1u32 << (32 - prefix);
                let blocks = 4096 / size;
                let base = BASE + (block % blocks) * size;
                let first = base + a % size;
                let last = (first + len).min(base + size - 1);
                GenRange {
                    first,
                    last,
                    prefix,
                    gateway: gw.map(|g| BASE + g % 4096),
                }
            })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(usize),
        Commit(usize),
        Unreserve(usize),
        Used(u32),
        Released(u32),
        ReleasedKnown(usize),
    }

    fn gen_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..6).prop_map(Op::Reserve),
            2 => any::<usize>().prop_map(Op::Commit),
            2 => any::<usize>().prop_map(Op::Unreserve),
            2 => (0u32..4096).prop_map(|o| Op::Used(BASE + o)),
            1 => (0u32..4096).prop_map(|o| Op::Released(BASE + o)),
            2 => any::<usize>().prop_map(Op::ReleasedKnown),
        ]
    }

    struct Model {
        ranges: Vec<GenRange>,
        allocatable: BTreeSet<u32>,
        known: BTreeSet<u32>,
        reserved: BTreeSet<u32>,
    }

    impl Model {
        fn new(ranges: Vec<GenRange>, pre: &BTreeMap<String, u32>) -> Self {
            let gateways: BTreeSet<u32> = ranges.iter().filter_map(|r| r.gateway).collect();
            let mut allocatable = BTreeSet::new();
            for a in BASE..BASE + 4096 {
                let Some(owner) = ranges.iter().find(|r| (r.first..=r.last).contains(&a)) else {
                    continue;
                };
                let net_or_bcast = owner.prefix < 31 && {
                    let mask = (1u32 << (32 - owner.prefix)) - 1;
                    a & mask == 0 || a & mask == mask
                };
                if gateways.contains(&a) || net_or_bcast || pre.values().any(|&p| p == a) {
                    continue;
                }
                allocatable.insert(a);
            }
            Model {
                ranges,
                allocatable,
                known: BTreeSet::new(),
                reserved: BTreeSet::new(),
            }
        }

        fn is_free(&self, a: u32) -> bool {
            self.allocatable.contains(&a) && !self.known.contains(&a) && !self.reserved.contains(&a)
        }

        fn first_free(&self) -> Option<u32> {
            self.ranges
                .iter()
                .flat_map(|r| r.first..=r.last)
                .find(|&a| self.is_free(a))
        }

        fn free_count(&self) -> usize {
            self.allocatable
                .iter()
                .filter(|&&a| self.is_free(a))
                .count()
        }
    }

    fn pick(set: &BTreeSet<u32>, i: usize) -> Option<u32> {
        (!set.is_empty()).then(|| *set.iter().nth(i % set.len()).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn allocator_matches_naive_model(
            ranges in prop::collection::vec(gen_range(), 1..=3),
            pre_idx in prop::collection::vec((0usize..8, any::<usize>()), 0..4),
            random in any::<bool>(),
            ops in prop::collection::vec(gen_op(), 0..120),
            seed in any::<u64>(),
        ) {
            // pre-allocations: claims c0..c7 (reserve uses c0..c5; c6, c7 act as dummies)
            let all: Vec<u32> = ranges.iter().flat_map(|r| r.first..=r.last).collect();
            let pre: BTreeMap<String, u32> = pre_idx
                .iter()
                .map(|&(c, i)| (format!("c{c}"), all[i % all.len()]))
                .collect();
            let input = PoolInput {
                namespace: "ns".into(),
                name: "p".into(),
                name_prefix: "p".into(),
                ranges: ranges
                    .iter()
                    .map(|r| RangeInput {
                        start: Some(Ipv4Addr::from(r.first).to_string()),
                        end: Some(Ipv4Addr::from(r.last).to_string()),
                        prefix: Some(i64::from(r.prefix)),
                        gateway: r.gateway.map(|g| Ipv4Addr::from(g).to_string()),
                        ..Default::default()
                    })
                    .collect(),
                pre_allocations: pre
                    .iter()
                    .map(|(c, a)| (c.clone(), Ipv4Addr::from(*a).to_string()))
                    .collect(),
                allocation_strategy: Some(if random { "random" } else { "sequential" }.into()),
                ..Default::default()
            };
            let pool = parse_pool(&input).unwrap();
            let mut model = Model::new(ranges, &pre);
            prop_assert_eq!(pool.size(), model.allocatable.len());
            let mut s = PoolState::new(pool, []);
            let rng = &mut StdRng::seed_from_u64(seed);
            for op in ops {
                match op {
                    Op::Reserve(c) => {
                        let claim = format!("c{c}");
                        let peeked = s.try_peek(&claim, &[]);
                        let got = s.reserve(&claim, rng);
                        if let Some(&p) = pre.get(&claim) {
                            let gw = model.ranges.iter().any(|r| r.gateway == Some(p));
                            let owner = model.ranges.iter().find(|r| (r.first..=r.last).contains(&p)).unwrap();
                            let nb = owner.prefix < 31 && {
                                let m = (1u32 << (32 - owner.prefix)) - 1;
                                p & m == 0 || p & m == m
                            };
                            if gw || nb {
                                let unusable =
                                    matches!(got, Err(AllocError::UnusablePreAllocation { .. }));
                                prop_assert!(unusable);
                            } else {
                                prop_assert_eq!(got.clone(), Ok(Ipv4Addr::from(p)));
                                model.reserved.insert(p);
                            }
                            prop_assert_eq!(peeked, got);
                        } else {
                            match model.first_free() {
                                None => {
                                    prop_assert!(got.as_ref().is_err_and(AllocError::is_exhausted));
                                    prop_assert!(peeked.is_err());
                                }
                                Some(first) => {
                                    let a = u32::from(got.clone().unwrap());
                                    prop_assert!(model.is_free(a), "{} not free", Ipv4Addr::from(a));
                                    prop_assert!(!pre.values().any(|&p| p == a));
                                    if !random {
                                        prop_assert_eq!(a, first);
                                    }
                                    prop_assert_eq!(peeked, Ok(Ipv4Addr::from(first)));
                                    model.reserved.insert(a);
                                }
                            }
                        }
                    }
                    Op::Commit(i) => {
                        if let Some(a) = pick(&model.reserved, i) {
                            s.commit(Ipv4Addr::from(a));
                            model.reserved.remove(&a);
                            model.known.insert(a);
                        }
                    }
                    Op::Unreserve(i) => {
                        if let Some(a) = pick(&model.reserved, i) {
                            s.unreserve(Ipv4Addr::from(a));
                            model.reserved.remove(&a);
                        }
                    }
                    Op::Used(a) => {
                        s.observe_used(Ipv4Addr::from(a));
                        model.known.insert(a);
                    }
                    Op::Released(a) => {
                        s.observe_released(Ipv4Addr::from(a));
                        model.known.remove(&a);
                    }
                    Op::ReleasedKnown(i) => {
                        if let Some(a) = pick(&model.known, i) {
                            s.observe_released(Ipv4Addr::from(a));
                            model.known.remove(&a);
                        }
                    }
                }
                let free = model.free_count();
                prop_assert_eq!(s.free(), free);
                prop_assert_eq!(s.used(), model.allocatable.len() - free);
                // peek with skip == first free after skipping
                if let Some(first) = model.first_free() {
                    let second = model
                        .ranges
                        .iter()
                        .flat_map(|r| r.first..=r.last)
                        .find(|&a| a != first && model.is_free(a));
                    let skip = [Ipv4Addr::from(first)];
                    match second {
                        Some(b) => prop_assert_eq!(s.peek("zz", &skip), Some(Ipv4Addr::from(b))),
                        None => prop_assert!(s.peek("zz", &skip).is_none()),
                    }
                }
            }
        }
    }
}
