//! The IPPool parser and the range arithmetic: an IPPool spec (fuzzed JSON, or a structured
//! spec whose ranges crowd a small address space) goes through the same conversion and
//! `parse_pool` as a watched pool; then a sequence of reserve / commit / unreserve /
//! observe operations runs on its `PoolState`. A third mode drives `IntervalSet` directly.
//!
//! Invariants checked against a model computed apart from the allocator:
//! - a parsed range is well formed (1 <= prefix <= 32, first <= last, inside one network);
//! - `size()` is the number of addresses in the ranges, less gateways, the network and
//!   broadcast addresses of each address's owning range (prefix < 31) and pre-allocations;
//! - reserve never hands out an address outside the ranges, a gateway, a network or
//!   broadcast address, a pre-allocated address (to another claim), or an address already
//!   reserved or known; sequential gives the lowest free address in declaration order;
//! - a full pool says so exactly when nothing is free; `used() + free() == size()`.
#![no_main]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use arbitrary::{Arbitrary, Unstructured};
use cape_static_ip::cluster::crd::{IPPool, IPPoolRange, IPPoolSpec};
use cape_static_ip::cluster::index::pool_input;
use cape_static_ip::ipam::interval::IntervalSet;
use cape_static_ip::ipam::{AllocError, Pool, PoolState, parse_pool};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Addresses crowd 10.0.0.0/22 so that ranges overlap and gateways fall inside them; `Any`
/// reaches the edges of the address space (0.0.0.0, 255.255.255.255).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Near(u16),
    Any(u32),
}

impl Addr {
    fn raw(self) -> u32 {
        match self {
            Addr::Near(n) => 0x0a00_0000 + u32::from(n % 1024),
            Addr::Any(n) => n,
        }
    }
    fn text(self) -> String {
        Ipv4Addr::from(self.raw()).to_string()
    }
}

#[derive(Arbitrary, Debug)]
struct FuzzRange {
    start: Option<Addr>,
    end: Option<Addr>,
    /// Subnet address and length (0..=40 reaches the invalid ones).
    subnet: Option<(Addr, u8)>,
    prefix: Option<i8>,
    gateway: Option<Addr>,
    dns: Vec<Addr>,
}

#[derive(Arbitrary, Debug)]
struct FuzzSpec {
    ranges: Vec<FuzzRange>,
    prefix: Option<i8>,
    gateway: Option<Addr>,
    dns: Vec<Addr>,
    pre: Vec<(u8, Addr)>,
    random: bool,
}

impl FuzzSpec {
    fn spec(&self) -> IPPoolSpec {
        IPPoolSpec {
            name_prefix: "p".into(),
            pools: self
                .ranges
                .iter()
                .map(|r| IPPoolRange {
                    start: r.start.map(Addr::text),
                    end: r.end.map(Addr::text),
                    subnet: r.subnet.map(|(a, l)| format!("{}/{}", a.text(), l % 41)),
                    prefix: r.prefix.map(i64::from),
                    gateway: r.gateway.map(Addr::text),
                    dns_servers: r.dns.iter().map(|a| a.text()).collect(),
                })
                .collect(),
            prefix: self.prefix.map(i64::from),
            gateway: self.gateway.map(Addr::text),
            dns_servers: self.dns.iter().map(|a| a.text()).collect(),
            pre_allocations: self
                .pre
                .iter()
                .map(|(c, a)| (format!("c{}", c % 8), a.text()))
                .collect(),
            allocation_strategy: self.random.then(|| "random".into()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Claims c0..c9: c0..c7 may be pre-allocated.
    Reserve(u8),
    Commit(u8),
    Unreserve(u8),
    Used(Addr),
    Released(Addr),
    ReleasedKnown(u8),
    Peek(u8),
}

#[derive(Arbitrary, Debug)]
enum SetOp {
    Insert(u64),
    Remove(u64),
    InsertRange(u64, u8),
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        // The spec as JSON (what the watch gives), then operations after a NUL byte.
        0 => {
            let (json, ops) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let Ok(spec) = serde_json::from_slice::<IPPoolSpec>(json) else {
                return;
            };
            run(spec, Unstructured::new(ops));
        }
        1 => {
            let mut u = Unstructured::new(rest);
            let Ok(spec) = FuzzSpec::arbitrary(&mut u) else {
                return;
            };
            run(spec.spec(), u);
        }
        _ => intervals(Unstructured::new(rest)),
    }
});

fn run(spec: IPPoolSpec, mut u: Unstructured<'_>) {
    let mut object = IPPool::new("pool", spec);
    object.metadata.namespace = Some("ns".into());
    let input = pool_input(&object);
    let Ok(pool) = parse_pool(&input) else {
        return;
    };
    let model = Model::new(&pool);
    assert_eq!(
        pool.size() as u64,
        model.size(),
        "size of {:?}",
        pool.ranges
    );
    let seed = u64::arbitrary(&mut u).unwrap_or(0);
    let ops: Vec<Op> = Vec::arbitrary(&mut u).unwrap_or_default();
    let known: Vec<Addr> = Vec::arbitrary(&mut u).unwrap_or_default();
    let rng = &mut StdRng::seed_from_u64(seed);

    let mut known: BTreeSet<u32> = known.into_iter().map(Addr::raw).collect();
    let mut state = PoolState::new(pool.clone(), known.iter().map(|&a| Ipv4Addr::from(a)));
    // Addresses handed out by reserve and not yet committed or given back.
    let mut reserved: BTreeSet<u32> = BTreeSet::new();
    let pinned: BTreeSet<u32> = pool
        .pre_allocations
        .values()
        .map(|&a| u32::from(a))
        .collect();
    let sequential = pool.strategy == cape_static_ip::ipam::Strategy::Sequential;
    for op in ops.into_iter().take(200) {
        match op {
            Op::Reserve(c) => {
                let claim = format!("c{}", c % 10);
                let peeked = state.try_peek(&claim, &[]);
                let got = state.reserve(&claim, rng);
                if let Some(pin) = pool.pre_allocation(&claim) {
                    let raw = u32::from(pin);
                    match &got {
                        Ok(a) => {
                            assert_eq!(*a, pin);
                            assert!(model.usable(raw), "{pin} pinned but unusable");
                            reserved.insert(raw);
                        }
                        Err(AllocError::UnusablePreAllocation { ip, .. }) => {
                            assert_eq!(*ip, pin);
                            assert!(!model.usable(raw), "{pin} usable but refused");
                        }
                        Err(e) => panic!("pinned claim {claim}: {e}"),
                    }
                    assert_eq!(peeked, got);
                    continue;
                }
                let taken = |a: u32| known.contains(&a) || reserved.contains(&a);
                match got {
                    Ok(a) => {
                        let raw = u32::from(a);
                        assert!(model.allocatable(raw), "{a} is not allocatable");
                        assert!(!pinned.contains(&raw), "{a} is pre-allocated");
                        assert!(!taken(raw), "{a} handed out twice");
                        if sequential {
                            assert_eq!(peeked, Ok(a));
                            if let Some(first) = model.first_free(&taken) {
                                assert_eq!(raw, first, "not the lowest free address");
                            }
                        }
                        reserved.insert(raw);
                    }
                    Err(e) => {
                        assert!(e.is_exhausted(), "{e}");
                        assert!(peeked.is_err());
                        assert_eq!(state.free(), 0, "full with free addresses");
                        if let Some(first) = model.first_free(&taken) {
                            panic!("full, but {} is free", Ipv4Addr::from(first));
                        }
                    }
                }
            }
            Op::Commit(i) => {
                if let Some(a) = pick(&reserved, i) {
                    state.commit(Ipv4Addr::from(a));
                    reserved.remove(&a);
                    known.insert(a);
                }
            }
            Op::Unreserve(i) => {
                if let Some(a) = pick(&reserved, i) {
                    state.unreserve(Ipv4Addr::from(a));
                    reserved.remove(&a);
                }
            }
            Op::Used(a) => {
                state.observe_used(Ipv4Addr::from(a.raw()));
                known.insert(a.raw());
            }
            Op::Released(a) => {
                state.observe_released(Ipv4Addr::from(a.raw()));
                known.remove(&a.raw());
            }
            Op::ReleasedKnown(i) => {
                if let Some(a) = pick(&known, i) {
                    state.observe_released(Ipv4Addr::from(a));
                    known.remove(&a);
                }
            }
            Op::Peek(c) => {
                // Successive peeks, each skipping the ones before (the devices of one request).
                let taken = |a: u32| known.contains(&a) || reserved.contains(&a);
                let mut skip: Vec<Ipv4Addr> = Vec::new();
                for _ in 0..=c % 4 {
                    let Some(a) = state.peek("zz", &skip) else {
                        break;
                    };
                    let raw = u32::from(a);
                    assert!(model.allocatable(raw), "peeked {a}: not allocatable");
                    assert!(!skip.contains(&a) && !taken(raw), "peeked {a}: taken");
                    if skip.is_empty()
                        && let Some(first) = model.first_free(&taken)
                    {
                        assert_eq!(raw, first, "peek is not the lowest free address");
                    }
                    skip.push(a);
                }
            }
        }
        // Counters against the model: used = allocatable addresses known or reserved.
        let used = known
            .union(&reserved)
            .filter(|&&a| model.allocatable(a))
            .count();
        assert_eq!(state.used(), used, "used");
        assert_eq!(state.used() + state.free(), pool.size());
        for &a in reserved.iter().chain(known.iter()).take(8) {
            assert!(!state.is_free(Ipv4Addr::from(a)));
        }
    }
}

fn pick(set: &BTreeSet<u32>, i: u8) -> Option<u32> {
    (!set.is_empty()).then(|| *set.iter().nth(usize::from(i) % set.len()).unwrap())
}

/// The pool's meaning, computed from its ranges alone (not from the allocator's structures).
struct Model {
    /// (first, last, prefix) in declaration order.
    ranges: Vec<(u32, u32, u8)>,
    gateways: BTreeSet<u32>,
    pinned: BTreeSet<u32>,
}

impl Model {
    fn new(pool: &Pool) -> Self {
        for r in &pool.ranges {
            assert!((1..=32).contains(&r.prefix), "prefix {}", r.prefix);
            assert!(r.first <= r.last);
            let mask = u32::MAX.checked_shl(32 - u32::from(r.prefix)).unwrap_or(0);
            assert_eq!(r.first & mask, r.last & mask, "range crosses a network");
        }
        for &p in pool.pre_allocations.values() {
            assert!(pool.contains(p), "pre-allocation {p} outside the ranges");
        }
        Model {
            ranges: pool
                .ranges
                .iter()
                .map(|r| (r.first, r.last, r.prefix))
                .collect(),
            gateways: pool
                .ranges
                .iter()
                .filter_map(|r| r.gateway)
                .map(u32::from)
                .collect(),
            pinned: pool
                .pre_allocations
                .values()
                .map(|&a| u32::from(a))
                .collect(),
        }
    }

    fn owner(&self, a: u32) -> Option<(u32, u32, u8)> {
        self.ranges
            .iter()
            .copied()
            .find(|&(f, l, _)| (f..=l).contains(&a))
    }

    /// In a range, not a gateway, not its owner's network or broadcast address.
    fn usable(&self, a: u32) -> bool {
        let Some((_, _, prefix)) = self.owner(a) else {
            return false;
        };
        if self.gateways.contains(&a) {
            return false;
        }
        if prefix < 31 {
            let host = (1u32 << (32 - prefix)) - 1;
            if a & host == 0 || a & host == host {
                return false;
            }
        }
        true
    }

    fn allocatable(&self, a: u32) -> bool {
        self.usable(a) && !self.pinned.contains(&a)
    }

    /// Addresses covered by the ranges, less the excluded ones that are covered.
    fn size(&self) -> u64 {
        let mut spans: Vec<(u64, u64)> = self
            .ranges
            .iter()
            .map(|&(f, l, _)| (u64::from(f), u64::from(l)))
            .collect();
        spans.sort();
        let mut covered = 0u64;
        let mut end: Option<u64> = None;
        for (f, l) in spans {
            let from = match end {
                Some(e) if e >= f => e + 1,
                _ => f,
            };
            if l >= from {
                covered += l - from + 1;
            }
            end = Some(end.map_or(l, |e| e.max(l)));
        }
        let mut candidates: BTreeSet<u32> = self.gateways.union(&self.pinned).copied().collect();
        for &(f, _, prefix) in &self.ranges {
            if prefix < 31 {
                let host = (1u32 << (32 - prefix)) - 1;
                candidates.insert(f & !host);
                candidates.insert(f | host);
            }
        }
        let excluded = candidates
            .into_iter()
            .filter(|&a| self.owner(a).is_some() && !self.allocatable(a))
            .count() as u64;
        covered - excluded
    }

    /// The lowest free address in declaration order, when the ranges are small enough to walk.
    fn first_free(&self, taken: &dyn Fn(u32) -> bool) -> Option<u32> {
        let total: u64 = self
            .ranges
            .iter()
            .map(|&(f, l, _)| u64::from(l - f) + 1)
            .sum();
        if total > 1 << 16 {
            return None;
        }
        self.ranges
            .iter()
            .flat_map(|&(f, l, _)| f..=l)
            .find(|&a| self.allocatable(a) && !taken(a))
    }
}

/// `IntervalSet` against a `BTreeSet`, near 0 and near `u64::MAX`.
fn intervals(mut u: Unstructured<'_>) {
    let high = bool::arbitrary(&mut u).unwrap_or(false);
    let base = if high { u64::MAX - 300 } else { 0 };
    let ops: Vec<SetOp> = Vec::arbitrary(&mut u).unwrap_or_default();
    let mut set = IntervalSet::new();
    let mut model: BTreeSet<u64> = BTreeSet::new();
    let at = |x: u64| base.saturating_add(x % 301);
    for op in ops.into_iter().take(300) {
        match op {
            SetOp::Insert(x) => assert_eq!(set.insert(at(x)), model.insert(at(x))),
            SetOp::Remove(x) => assert_eq!(set.remove(at(x)), model.remove(&at(x))),
            SetOp::InsertRange(x, len) => {
                let (a, b) = (at(x), at(x).saturating_add(u64::from(len)));
                set.insert_range(a, b);
                model.extend(a..=b);
            }
        }
        assert_eq!(set.len(), model.len() as u64);
        assert_eq!(set.first(), model.first().copied());
        let iv: Vec<(u64, u64)> = set.intervals().collect();
        for w in iv.windows(2) {
            assert!(w[0].1 + 1 < w[1].0, "intervals touch: {iv:?}");
        }
        let flat: Vec<u64> = iv.iter().flat_map(|&(a, b)| a..=b).collect();
        assert!(flat.iter().eq(model.iter()), "{iv:?}");
    }
    for probe in [0u64, 1, 150, 299, 300] {
        let p = at(probe);
        assert_eq!(set.contains(p), model.contains(&p));
        assert_eq!(set.first_at_or_after(p), model.range(p..).next().copied());
        let lo = at(probe / 2);
        let gaps: Vec<u64> = set
            .gaps_within(lo, p)
            .into_iter()
            .flat_map(|(a, b)| a..=b)
            .collect();
        let want: Vec<u64> = (lo..=p).filter(|x| !model.contains(x)).collect();
        assert_eq!(gaps, want);
    }
}
