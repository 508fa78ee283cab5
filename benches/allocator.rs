//! Allocator micro-benchmarks (criterion): the cost of choosing the next free address and of
//! applying watch events, on an empty /16 and on a /16 with 60,000 addresses already used.
//! `cargo bench --bench allocator` (part of `make bench`).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Duration;

use cape_static_ip::ipam::{PoolInput, PoolState, RangeInput, parse_pool};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const USED: usize = 60_000;

/// 10.0.0.0/16, gateway 10.0.0.1: 65,533 allocatable addresses.
fn slash16(strategy: &str) -> cape_static_ip::ipam::Pool {
    parse_pool(&PoolInput {
        namespace: "bench".into(),
        name: "big".into(),
        name_prefix: "big".into(),
        ranges: vec![RangeInput {
            subnet: Some("10.0.0.0/16".into()),
            ..Default::default()
        }],
        prefix: Some(16),
        gateway: Some("10.0.0.1".into()),
        allocation_strategy: Some(strategy.into()),
        ..Default::default()
    })
    .expect("pool parses")
}

fn host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 2)) + i)
}

/// The first 60k hosts used (one long run: what sequential allocation leaves behind).
fn contiguous() -> Vec<Ipv4Addr> {
    (0..USED as u32).map(host).collect()
}

/// 60k hosts used at random (the worst shape for an interval set: ~5k holes).
fn scattered() -> Vec<Ipv4Addr> {
    let mut all: Vec<Ipv4Addr> = (0..65_533u32).map(host).collect();
    all.shuffle(&mut StdRng::seed_from_u64(7));
    all.truncate(USED);
    all
}

fn next_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("next_free");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    let cases: [(&str, &str, Vec<Ipv4Addr>); 5] = [
        ("empty_/16", "sequential", Vec::new()),
        ("60k_contiguous_/16", "sequential", contiguous()),
        ("60k_scattered_/16", "sequential", scattered()),
        ("empty_/16_random", "random", Vec::new()),
        ("60k_scattered_/16_random", "random", scattered()),
    ];
    for (name, strategy, used) in cases {
        let mut state = PoolState::new(slash16(strategy), used.iter().copied());
        let mut rng = StdRng::seed_from_u64(1);
        g.bench_function(format!("reserve+unreserve/{name}"), |b| {
            b.iter(|| {
                let ip = state.reserve(black_box("ns-m-0"), &mut rng).unwrap();
                state.unreserve(black_box(ip));
                ip
            })
        });
        // reserve + commit (the create succeeded), then the address is released again by a
        // watch delete so that the fill stays the same from one iteration to the next.
        g.bench_function(format!("reserve+commit/{name}"), |b| {
            b.iter(|| {
                let ip = state.reserve(black_box("ns-m-0"), &mut rng).unwrap();
                state.commit(ip);
                state.observe_released(ip);
                ip
            })
        });
    }
    g.finish();
}

fn watch_events(c: &mut Criterion) {
    let mut g = c.benchmark_group("watch_events");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (name, used) in [
        ("empty_/16", Vec::new()),
        ("60k_scattered_/16", scattered()),
    ] {
        let mut state = PoolState::new(slash16("sequential"), used.iter().copied());
        let mut rng = StdRng::seed_from_u64(2);
        // A free address that becomes used and is released again (add + delete events).
        g.bench_function(format!("observe_used+observe_released/{name}"), |b| {
            b.iter_batched(
                || host(rng.random_range(0..65_533)),
                |ip| {
                    if state.is_free(ip) {
                        state.observe_used(ip);
                        state.observe_released(ip);
                    } else {
                        // Already used: a duplicate add event (idempotent).
                        state.observe_used(ip);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    // A relist: the whole state rebuilt from 60k known addresses.
    let used = scattered();
    let pool = slash16("sequential");
    g.sample_size(10);
    g.bench_function("rebuild/60k_scattered_/16", |b| {
        b.iter(|| PoolState::new(pool.clone(), used.iter().copied()).free())
    });
    g.finish();
}

criterion_group!(benches, next_free, watch_events);
criterion_main!(benches);
