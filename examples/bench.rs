//! `make bench`: the end-to-end benchmark against a local control plane (etcd + kube-apiserver,
//! started by this process and stopped when it exits). Figures, not assertions: prints ONE
//! table and writes it as JSON to `target/bench/bench-<unix time>.json` and
//! `target/bench/latest.json`.
//!
//! 1. resident memory of the webhook binary (`target/release/cape-static-ip serve`, a child
//!    process) idle;
//! 2. bursts of ElfMachine creates through the apiserver (100 at concurrency 20, 200 at 50) on
//!    an empty /16, after a warm-up: admission latency (timed around the webhook's handler,
//!    and from its own Prometheus histogram), client create latency, machines/s;
//!    then apiserver requests per machine (its `apiserver_request_total`, scraped before and
//!    65 s after each burst, by verb and resource, the load generator's own requests taken
//!    out) for a create burst of 100 at 20 (machines with a CAPI Machine owner and CAPE's
//!    finalizer), its floor, and the delete burst of the same machines;
//! 3. the floor: the same number of bare creates of what one allocation writes (IPAddress,
//!    IPClaim, claim status, ElfMachine; no webhook) at the same concurrency, each round
//!    right after the burst it is compared with (3 rounds; latencies over all of them,
//!    machines/s their median);
//! 4. the same bursts on a /16 with 60,000 addresses already used (pre-filled at 64 in flight);
//! 5. resident memory of a fresh webhook child with 100,000 IPAM objects cached (the binary
//!    allocates with jemalloc; steady, 15 s after ready, and 1 s after);
//! 6. admission calls per machine life (create, 10 metadata/spec patches as CAPI and CAPE
//!    make them, deletion with CAPE's finalizer removed, release), 100 machines, with the
//!    registration's `matchConditions` and without them (an apiserver before 1.28);
//! 7. the allocator micro-benchmarks, read from criterion's output when `cargo bench --bench
//!    allocator` ran first (as `make bench` does).
//!
//! Environment: `BENCH_MEM_OBJECTS` (default 100000) IPAM objects for the memory figure,
//! `BENCH_FILL_BUDGET_SECS` (default 240) the most time spent creating them (the rest is
//! extrapolated, and labelled so), `BENCH_PREFILL` (default 60000) addresses used in the full pool,
//! `BENCH_COUNT_SETTLE_SECS` (default 65: one periodic pass) the wait before counting, `BENCH_MALLOC_CONF`
//! (jemalloc settings for the child, as `_RJEM_MALLOC_CONF`: default the Deployment's, empty for jemalloc's), `BENCH_RSS_SETTLE_SECS` (15), `BENCH_ONLY=requests` only the request counts.
//!
//! `BENCH_ONLY=relist` (`make bench-relist`) measures only the webhook's steady and peak RSS
//! with 100,000 IPAM objects present and with `BENCH_MEM_OBJECTS` when larger (its fill budget
//! defaults to 1800 s; `BENCH_HOLD_SECS` keeps the objects and control plane that long after,
//! for a profiler).

#[allow(dead_code)]
#[path = "../tests/common/controlplane.rs"]
mod controlplane;
#[allow(dead_code)]
#[path = "../tests/common/life.rs"]
mod life;
#[allow(dead_code)]
#[path = "../tests/common/webhook.rs"]
mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use cape_static_ip::assign::Assigner;
use cape_static_ip::cluster::cache::Caches;
use cape_static_ip::events::Events;
use cape_static_ip::ipam::PoolKey;
use cape_static_ip::lifecycle::{Lifecycle, LifecycleOptions};
use cape_static_ip::metrics::Metrics;
use cape_static_ip::webhook::server::{AppState, webhook_router};
use cape_static_ip::webhook::tls::ReloadingCert;
use controlplane::{CrdSet, shared, temp_namespace};
use futures::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use webhook::{capi_machine, create, dev_certs, dynamic, machines, pool, template};

type Samples = Arc<Mutex<Vec<f64>>>;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// The webhook in this process, with a timing layer around the handler.
struct InProcess {
    addr: SocketAddr,
    state: AppState,
    samples: Samples,
    _tasks: tokio::task::JoinSet<()>,
}

/// The webhook as `serve` runs it (caches, events, the background loops with their default
/// timings), plus a timing layer around the handler.
async fn start_webhook(client: &Client, certs: &Path) -> InProcess {
    let mut tasks = tokio::task::JoinSet::new();
    let caches = Caches::start(client, &mut tasks);
    let metrics = Arc::new(Metrics::default());
    let events = Events::start(client.clone(), &mut tasks);
    let state = AppState {
        assigner: Assigner {
            client: client.clone(),
            caches,
            default_namespace: "cape-system".into(),
            metrics: metrics.clone(),
            events,
            activity: Default::default(),
            claim_grace: Duration::from_secs(120),
            pending: Default::default(),
        },
        metrics: metrics.clone(),
        stopping: Arc::new(AtomicBool::new(false)),
        reviews: Default::default(),
        auth: Arc::new(cape_static_ip::webhook::auth::Authenticator::off(
            metrics.clone(),
        )),
    };
    let lifecycle = Lifecycle::new(
        state.assigner.clone(),
        metrics,
        LifecycleOptions {
            reuse_delay: Duration::ZERO,
            resync: Duration::from_secs(300),
            claim_grace: Duration::from_secs(120),
        },
    );
    tasks.spawn(lifecycle.run());
    let samples: Samples = Arc::default();
    let timing = samples.clone();
    let router = webhook_router(state.clone()).layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let timing = timing.clone();
            async move {
                let start = Instant::now();
                let resp = next.run(req).await;
                timing
                    .lock()
                    .unwrap()
                    .push(start.elapsed().as_secs_f64() * 1e3);
                resp
            }
        },
    ));
    let cert = ReloadingCert::new(certs.join("tls.crt"), certs.join("tls.key")).unwrap();
    let tls = Arc::new(cert.server_config(false));
    let (_, addr, serving) = cape_static_ip::webhook::listener::Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        Some(tls),
        router,
        Default::default(),
    )
    .unwrap();
    tokio::spawn(serving);
    state.assigner.caches.wait_ready().await;
    InProcess {
        addr,
        state,
        samples,
        _tasks: tasks,
    }
}

/// Registers the webhook for `ns` (with the shipped `matchConditions`, or without them as on
/// an apiserver before 1.28) and waits until the apiserver calls it.
async fn register(client: &Client, hook: &InProcess, ca_pem: &str, ns: &str, conditions: bool) {
    webhook::register_with(
        client,
        &format!("cape-static-ip-bench-{ns}"),
        hook.addr,
        ca_pem,
        ns,
        "Fail",
        conditions,
    )
    .await;
    let probe: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1", "kind": "ElfMachine",
        "metadata": {"name": "probe", "namespace": ns,
                     "labels": {"cluster.x-k8s.io/ip-pool-name": "no-such-pool-probe"}},
        "spec": {"network": {"devices": [{"networkType": "IPV4"}]}}
    }))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for _ in 0..400 {
        if let Err(kube::Error::Api(s)) = machines(client, ns).create(&dry, &probe).await
            && s.message.contains("no-such-pool-probe")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the apiserver never called the webhook for {ns}");
}

/// Admission calls during [`LIVES`] machine lives (life::machine_lives) in a namespace
/// registered without the conditions, then in one registered with them: (label, lives, calls by
/// operation), counted from the webhook's metrics.
async fn machine_lives(
    client: &Client,
    hook: &InProcess,
    ca_pem: &str,
) -> Vec<(&'static str, usize, std::collections::BTreeMap<String, u64>)> {
    let mut out = Vec::new();
    for (label, conditions, subnet) in [
        ("without matchConditions", false, "10.2.0.0/16"),
        ("with matchConditions", true, "10.3.0.0/16"),
    ] {
        let ns = temp_namespace(client, "bench-life").await;
        create(
            client,
            &ns,
            pool(
                "life",
                json!({"namePrefix": "life", "pools": [{"subnet": subnet}], "prefix": 16}),
                json!({}),
            ),
        )
        .await
        .unwrap();
        create(
            client,
            &ns,
            template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "life"})),
        )
        .await
        .unwrap();
        register(client, hook, ca_pem, &ns, conditions).await;
        eprintln!("bench: {LIVES} machine lives, {label}");
        let before = life::admission_calls(&hook.state.metrics.encode());
        life::machine_lives(client, &ns, "life", "tpl", LIVES, 20).await;
        let after = life::admission_calls(&hook.state.metrics.encode());
        out.push((label, LIVES, life::calls_between(&before, &after)));
    }
    out
}

/// Machines per life measurement.
const LIVES: usize = 100;

/// `le` → cumulative count of the admission histogram, summed over labels.
fn histogram(metrics: &Metrics) -> Vec<(f64, f64)> {
    let mut buckets: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for line in metrics.encode().lines() {
        let Some(rest) = line.strip_prefix("cape_static_ip_admission_duration_seconds_bucket{")
        else {
            continue;
        };
        let Some(le) = rest.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else {
            continue;
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let e = buckets.entry(le.to_string()).or_insert((bound, 0.0));
        e.1 += count;
    }
    let mut v: Vec<(f64, f64)> = buckets.into_values().collect();
    v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    v
}

/// Prometheus' histogram_quantile over the difference of two snapshots, in ms.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|x| x.1)
                .unwrap_or(0.0);
            (*le, c - b)
        })
        .collect();
    let Some(&(_, total)) = delta.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &delta {
        if c >= rank {
            if le.is_infinite() {
                return prev.0 * 1e3;
            }
            let frac = if c > prev.1 {
                (rank - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return (prev.0 + (le - prev.0) * frac) * 1e3;
        }
        prev = (le, c);
    }
    f64::NAN
}

#[derive(Debug, Clone, serde::Serialize)]
struct Burst {
    pool: String,
    machines: usize,
    concurrency: usize,
    admission_ms: [f64; 3],
    admission_hist_ms: [f64; 3],
    create_ms: [f64; 2],
    /// The median over the rounds.
    machines_per_s: f64,
    rounds_per_s: Vec<f64>,
    /// Admission p99 of each round (timed around the handler).
    rounds_p99_ms: Vec<f64>,
    failures: usize,
    #[serde(skip)]
    admission_raw: Vec<f64>,
    #[serde(skip)]
    create_raw: Vec<f64>,
}

/// Cumulative histogram buckets: (upper bound in seconds, count).
type Buckets = [(f64, f64)];

impl Burst {
    /// The latency figures of sorted samples (and of the webhook's histogram between two
    /// scrapes); the samples are kept for merging rounds, throughput is left at zero.
    fn of(
        ns: &str,
        machines: usize,
        concurrency: usize,
        admission: &[f64],
        create: &[f64],
        (before, after): (&Buckets, &Buckets),
    ) -> Burst {
        Burst {
            pool: ns.to_string(),
            machines,
            concurrency,
            admission_ms: [50.0, 90.0, 99.0].map(|p| percentile(admission, p)),
            admission_hist_ms: [0.5, 0.9, 0.99].map(|q| histogram_quantile(before, after, q)),
            create_ms: [50.0, 99.0].map(|p| percentile(create, p)),
            machines_per_s: 0.0,
            rounds_per_s: Vec::new(),
            rounds_p99_ms: Vec::new(),
            failures: 0,
            admission_raw: admission.to_vec(),
            create_raw: create.to_vec(),
        }
    }
}

/// Measured rounds of each burst and floor: latencies are taken over all rounds,
/// throughput is their median, so that one disturbed round does not decide a figure.
const ROUNDS: usize = 3;

fn rounds_text(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn median(v: &[f64]) -> f64 {
    percentile(&sorted(v.to_vec()), 50.0)
}

/// `ROUNDS` bursts of `n` at `concurrency` on `ns`, each followed (after a pause that lets
/// its background work settle) by the floor of the same shape in `floor_ns`.
async fn rounds(
    client: &Client,
    hook: &InProcess,
    ns: &str,
    tag: &str,
    n: usize,
    concurrency: usize,
    floor_ns: Option<(&str, usize)>,
) -> (Burst, Option<Floor>) {
    let settle = || tokio::time::sleep(Duration::from_secs(2));
    let before = histogram(&hook.state.metrics);
    let mut bursts = Vec::new();
    let mut floors = Vec::new();
    for r in 0..ROUNDS {
        settle().await;
        let b = burst(client, hook, ns, &format!("{tag}{r}"), n, concurrency).await;
        eprintln!(
            "bench: {ns} {n} @ {concurrency} round {r}: {:.1} machines/s, admission p99 {:.1} ms",
            b.machines_per_s, b.admission_ms[2]
        );
        bursts.push(b);
        if let Some((floor_ns, base)) = floor_ns {
            settle().await;
            let prefix = format!("f{tag}{r}");
            floors.push(floor(client, floor_ns, &prefix, base + r * n, n, concurrency).await);
        }
    }
    let after = histogram(&hook.state.metrics);
    let admission = sorted(
        bursts
            .iter()
            .flat_map(|b| b.admission_raw.clone())
            .collect(),
    );
    let create = sorted(bursts.iter().flat_map(|b| b.create_raw.clone()).collect());
    let per_s: Vec<f64> = bursts.iter().map(|b| b.machines_per_s).collect();
    let merged = Burst {
        machines_per_s: median(&per_s),
        rounds_per_s: per_s,
        rounds_p99_ms: bursts.iter().map(|b| b.admission_ms[2]).collect(),
        failures: bursts.iter().map(|b| b.failures).sum(),
        admission_raw: Vec::new(),
        create_raw: Vec::new(),
        ..Burst::of(ns, n, concurrency, &admission, &create, (&before, &after))
    };
    let floor = (!floors.is_empty()).then(|| {
        let chains = sorted(floors.iter().flat_map(|f| f.chain_raw.clone()).collect());
        let per_s: Vec<f64> = floors.iter().map(|f| f.machines_per_s).collect();
        Floor {
            machines: n,
            concurrency,
            machines_per_s: median(&per_s),
            rounds_per_s: per_s,
            chain_ms: [percentile(&chains, 50.0), percentile(&chains, 99.0)],
            chain_raw: Vec::new(),
        }
    });
    (merged, floor)
}

async fn burst(
    client: &Client,
    hook: &InProcess,
    ns: &str,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> Burst {
    hook.samples.lock().unwrap().clear();
    let before = histogram(&hook.state.metrics);
    let start = Instant::now();
    let results: Vec<Result<f64, String>> = futures::stream::iter((0..n).map(|i| {
        let (client, ns) = (client.clone(), ns.to_string());
        let name = format!("{prefix}-{i:04}");
        async move {
            let t = Instant::now();
            let m = create(
                &client,
                &ns,
                capi_machine(
                    &name,
                    "tpl",
                    json!([{"networkType": "IPV4", "vlan": "vlan-1"}]),
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let m = serde_json::to_value(m).unwrap();
            if m["spec"]["network"]["devices"][0]["ipAddrs"][0].is_string() {
                Ok(ms)
            } else {
                Err("no address".into())
            }
        }
    }))
    .buffer_unordered(concurrency)
    .collect()
    .await;
    let wall = start.elapsed().as_secs_f64();
    let after = histogram(&hook.state.metrics);
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = failures.first() {
        eprintln!("{} of {n} creates failed, first: {e}", failures.len());
    }
    let create = sorted(
        results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect(),
    );
    let admission = sorted(std::mem::take(&mut *hook.samples.lock().unwrap()));
    Burst {
        machines_per_s: create.len() as f64 / wall,
        failures: failures.len(),
        ..Burst::of(ns, n, concurrency, &admission, &create, (&before, &after))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Floor {
    machines: usize,
    concurrency: usize,
    /// The median over the rounds.
    machines_per_s: f64,
    rounds_per_s: Vec<f64>,
    chain_ms: [f64; 2],
    #[serde(skip)]
    chain_raw: Vec<f64>,
}

fn obj(v: Value) -> kube::core::DynamicObject {
    serde_json::from_value(v).unwrap()
}

/// The writes of one allocation without the webhook: IPAddress, IPClaim (with our
/// annotations, so that the background loop does not take it over as the Go controller's),
/// claim status, ElfMachine (with its address already in), one after the other; `n` such chains at
/// `concurrency`. Chain `i` writes address number `base + i` of 10.99.0.0/16.
async fn floor(
    client: &Client,
    ns: &str,
    prefix: &str,
    base: usize,
    n: usize,
    concurrency: usize,
) -> Floor {
    let addrs = dynamic(
        client,
        ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPAddress",
        "ipaddresses",
    );
    let claims = dynamic(
        client,
        ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPClaim",
        "ipclaims",
    );
    let elf = machines(client, ns);
    let start = Instant::now();
    let times: Vec<f64> = futures::stream::iter((0..n).map(|i| {
        let (addrs, claims, elf, ns) = (addrs.clone(), claims.clone(), elf.clone(), ns.to_string());
        let name = format!("{prefix}-{i:04}");
        async move {
            let t = Instant::now();
            let k = base + i;
            let ip = format!("10.99.{}.{}", k / 250, k % 250 + 1);
            let addr_name = format!("floor-{}", ip.replace('.', "-"));
            let claim_name = format!("{ns}-{name}-0");
            let labels = json!({"cluster.x-k8s.io/ip-owner-name": format!("{ns}-{name}"),
                                "cluster.x-k8s.io/cluster-name": "demo"});
            let pp = PostParams::default();
            addrs.create(&pp, &obj(json!({
                "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPAddress",
                "metadata": {"name": addr_name, "namespace": ns, "labels": labels},
                "spec": {"address": ip, "prefix": 16, "gateway": "10.99.255.254",
                         "pool": {"name": "floor", "namespace": ns, "kind": "IPPool", "apiVersion": "ipam.metal3.io/v1alpha1"},
                         "claim": {"name": claim_name, "namespace": ns, "kind": "IPClaim", "apiVersion": "ipam.metal3.io/v1alpha1"}}
            }))).await.unwrap();
            claims.create(&pp, &obj(json!({
                "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPClaim",
                "metadata": {"name": claim_name, "namespace": ns, "labels": labels,
                             "annotations": {"static-ip.infrastructure.cluster.x-k8s.io/machine": format!("{ns}/{name}"),
                                             "static-ip.infrastructure.cluster.x-k8s.io/device-index": "0"}},
                "spec": {"pool": {"name": "floor", "namespace": ns, "kind": "IPPool", "apiVersion": "ipam.metal3.io/v1alpha1"}}
            }))).await.unwrap();
            claims.patch_status(&claim_name, &PatchParams::default(), &Patch::Merge(json!(
                {"status": {"address": {"name": addr_name, "namespace": ns}}}
            ))).await.unwrap();
            let mut m = capi_machine(&name, "tpl", json!([{"networkType": "IPV4", "vlan": "vlan-1",
                "ipAddrs": [ip], "netmask": "255.255.0.0", "routes": [{"gateway": "10.99.255.254"}]}]));
            m["metadata"]["finalizers"] = json!(["elfmachinestaticip.infrastructure.cluster.x-k8s.io"]);
            elf.create(&pp, &obj(m)).await.unwrap();
            t.elapsed().as_secs_f64() * 1e3
        }
    }))
    .buffer_unordered(concurrency)
    .collect()
    .await;
    let wall = start.elapsed().as_secs_f64();
    let times = sorted(times);
    Floor {
        machines: n,
        concurrency,
        machines_per_s: n as f64 / wall,
        rounds_per_s: Vec::new(),
        chain_ms: [percentile(&times, 50.0), percentile(&times, 99.0)],
        chain_raw: times,
    }
}

// ---- requests per machine, from the apiserver's own counters ----

/// `apiserver_request_total`, summed by "VERB resource[/subresource]", for the API groups an
/// allocation touches (metal3 IPAM, CAPE, CAPI, events). The apiserver's own housekeeping
/// (leases, endpoints, ...) is in other groups and left out.
type Counts = std::collections::BTreeMap<String, f64>;

const COUNTED_GROUPS: [&str; 4] = [
    "ipam.metal3.io",
    "infrastructure.cluster.x-k8s.io",
    "cluster.x-k8s.io",
    "events.k8s.io",
];

async fn request_counts(client: &Client) -> Counts {
    let req = axum::http::Request::get("/metrics")
        .body(Vec::new())
        .unwrap();
    let text = client.request_text(req).await.expect("apiserver /metrics");
    let mut counts = Counts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(&format!("{key}=\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let (group, resource) = (label("group"), label("resource"));
        if !(COUNTED_GROUPS.contains(&group.as_str()) || (group.is_empty() && resource == "events"))
            || !label("dry_run").is_empty()
        {
            continue;
        }
        let sub = label("subresource");
        let key = if sub.is_empty() {
            format!("{} {resource}", label("verb"))
        } else {
            format!("{} {resource}/{sub}", label("verb"))
        };
        *counts.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    counts
}

fn is_read(key: &str) -> bool {
    matches!(key.split(' ').next(), Some("GET" | "LIST" | "WATCH"))
}

/// Requests per machine in one counted window: everything the apiserver served in the
/// counted groups, the load generator's own requests, and the difference (the webhook and
/// its background loops).
#[derive(Debug, Clone, serde::Serialize)]
struct RequestCount {
    what: String,
    machines: usize,
    concurrency: usize,
    /// Seconds waited after the burst before the second scrape.
    settle_s: f64,
    /// All requests in the window, per machine, by "VERB resource".
    total: Counts,
    /// The load generator's own requests, per machine.
    client: Counts,
    /// total - client, per machine.
    ours: Counts,
    ours_writes: f64,
    ours_reads: f64,
}

impl RequestCount {
    fn of(
        what: &str,
        (machines, concurrency): (usize, usize),
        settle: Duration,
        (before, after): (&Counts, &Counts),
        client: &Counts,
    ) -> Self {
        let n = machines.max(1) as f64;
        let mut total = Counts::new();
        for (k, v) in after {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            if d > 0.0 {
                total.insert(k.clone(), d / n);
            }
        }
        let client: Counts = client.iter().map(|(k, v)| (k.clone(), v / n)).collect();
        let mut ours = Counts::new();
        for (k, v) in &total {
            let d = v - client.get(k).copied().unwrap_or(0.0);
            if d.abs() > 1e-9 {
                ours.insert(k.clone(), d);
            }
        }
        let ours_reads = ours
            .iter()
            .filter(|(k, _)| is_read(k))
            .map(|(_, v)| v)
            .sum::<f64>()
            + 0.0; // an empty sum is -0.0
        let ours_writes = ours
            .iter()
            .filter(|(k, _)| !is_read(k))
            .map(|(_, v)| v)
            .sum::<f64>()
            + 0.0; // an empty sum is -0.0
        RequestCount {
            what: what.into(),
            machines,
            concurrency,
            settle_s: settle.as_secs_f64(),
            total,
            client,
            ours,
            ours_writes,
            ours_reads,
        }
    }

    fn text(counts: &Counts) -> String {
        if counts.is_empty() {
            return "none".into();
        }
        counts
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How long to wait after a burst before counting, so that background work is counted: longer
/// than one periodic pass of the background loop (every 60 s here: half the claim grace).
fn count_settle() -> Duration {
    Duration::from_secs(env_usize("BENCH_COUNT_SETTLE_SECS", 65) as u64)
}

/// An ElfMachine as CAPI and CAPE leave it: a Machine owner and CAPE's finalizer.
fn owned_machine(name: &str) -> Value {
    let mut m = capi_machine(
        name,
        "tpl",
        json!([{"networkType": "IPV4", "vlan": "vlan-1"}]),
    );
    m["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine", "name": name,
        "uid": "6f1e1f0e-8a4b-4c1e-9a3e-2b7d5f0c9a11", "controller": true,
        "blockOwnerDeletion": true
    }]);
    m["metadata"]["finalizers"] = json!([CAPE_FINALIZER]);
    m
}

const CAPE_FINALIZER: &str = "elfmachine.infrastructure.cluster.x-k8s.io";

fn add(counts: &mut Counts, key: &str, n: usize) {
    *counts.entry(key.into()).or_default() += n as f64;
}

/// Counts the requests of: a create burst (`n` owned machines at `concurrency`), the floor of
/// the same shape, and the delete burst of the same machines (delete, CAPE's finalizer removed,
/// our release awaited).
async fn count_requests(
    client: &Client,
    ns: &str,
    floor_ns: &str,
    n: usize,
    concurrency: usize,
) -> Vec<RequestCount> {
    let settle = count_settle();
    let shape = (n, concurrency);
    let mut out = Vec::new();
    // Let earlier bursts' background work finish first.
    tokio::time::sleep(settle).await;

    // Create burst.
    let before = request_counts(client).await;
    let created: usize = futures::stream::iter((0..n).map(|i| {
        let (client, ns) = (client.clone(), ns.to_string());
        async move {
            create(&client, &ns, owned_machine(&format!("req-{i:04}")))
                .await
                .map(|_| 1)
                .unwrap_or_else(|e| {
                    eprintln!("bench: counted create failed: {e}");
                    1
                })
        }
    }))
    .buffer_unordered(concurrency)
    .fold(0, |a, b| async move { a + b })
    .await;
    tokio::time::sleep(settle).await;
    let after = request_counts(client).await;
    let mut mine = Counts::new();
    add(&mut mine, "POST elfmachines", created);
    out.push(RequestCount::of(
        "create",
        shape,
        settle,
        (&before, &after),
        &mine,
    ));

    // The floor: 4 bare writes per machine.
    let before = request_counts(client).await;
    let _ = floor(client, floor_ns, "freq", 50_000, n, concurrency).await;
    tokio::time::sleep(settle).await;
    let after = request_counts(client).await;
    let mut mine = Counts::new();
    for k in [
        "POST ipaddresses",
        "POST ipclaims",
        "PATCH ipclaims/status",
        "POST elfmachines",
    ] {
        add(&mut mine, k, n);
    }
    out.push(RequestCount::of(
        "floor",
        shape,
        settle,
        (&before, &after),
        &mine,
    ));

    // Delete burst: delete, then CAPE removes its finalizer (a guarded JSON patch at the
    // index the created object has it: the webhook adds ours after it).
    let before = request_counts(client).await;
    let api = machines(client, ns);
    let steps: Vec<(usize, usize)> = futures::stream::iter((0..n).map(|i| {
        let api = api.clone();
        async move {
            let name = format!("req-{i:04}");
            let mut calls = (0, 0);
            if api.delete(&name, &Default::default()).await.is_ok() {
                calls.0 += 1;
            }
            let remove = json!([{"op": "test", "path": "/metadata/finalizers/0", "value": CAPE_FINALIZER},
                                {"op": "remove", "path": "/metadata/finalizers/0"}]);
            let patch: json_patch::Patch = serde_json::from_value(remove).unwrap();
            if let Err(e) = api
                .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
            {
                eprintln!("bench: removing CAPE's finalizer from {name}: {e}");
            }
            calls.1 += 1;
            calls
        }
    }))
    .buffer_unordered(concurrency)
    .collect()
    .await;
    // Polled with a LIST every half second (counted as the load generator's).
    let start = Instant::now();
    let mut lists = 0;
    while start.elapsed() < Duration::from_secs(300) {
        lists += 1;
        if api
            .list(&Default::default())
            .await
            .is_ok_and(|l| l.items.iter().all(|m| !m.name_any().starts_with("req-")))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let released_s = start.elapsed().as_secs_f64();
    eprintln!("bench: {n} machines released {released_s:.1} s after the last finalizer removal");
    tokio::time::sleep(settle).await;
    let after = request_counts(client).await;
    let mut mine = Counts::new();
    add(
        &mut mine,
        "DELETE elfmachines",
        steps.iter().map(|s| s.0).sum(),
    );
    add(
        &mut mine,
        "PATCH elfmachines",
        steps.iter().map(|s| s.1).sum(),
    );
    add(&mut mine, "LIST elfmachines", lists);
    out.push(RequestCount::of(
        "delete",
        shape,
        settle,
        (&before, &after),
        &mine,
    ));
    out
}

fn request_rows(counts: &[RequestCount], row: &mut impl FnMut(String, String, &str)) {
    for c in counts {
        let tag = format!("{}, {} @ {}", c.what, c.machines, c.concurrency);
        let (target, ours) = match c.what.as_str() {
            "floor" => ("", "the load generator only; beyond it".to_string()),
            "create" => ("<= 3.1 writes, <= 0.05 reads", "webhook".to_string()),
            _ => ("3 writes, <= 0.05 reads", "webhook".to_string()),
        };
        row(
            format!("requests/machine, {ours} ({tag}; +{:.0} s)", c.settle_s),
            format!(
                "{:.2} writes, {:.2} reads: {}",
                c.ours_writes,
                c.ours_reads,
                RequestCount::text(&c.ours)
            ),
            target,
        );
        row(
            format!("  all requests/machine ({tag})"),
            RequestCount::text(&c.total),
            "",
        );
    }
}

/// Creates `n` objects made by `make(i)` at 64 in flight, stopping early after `budget`.
/// Returns how many were created and how long it took.
async fn fill(
    api: &kube::Api<kube::core::DynamicObject>,
    n: usize,
    budget: Duration,
    make: impl Fn(usize) -> Value,
) -> (usize, f64) {
    let start = Instant::now();
    let created: usize = futures::stream::iter((0..n).map(|i| {
        let (api, o) = (api.clone(), obj(make(i)));
        async move {
            if start.elapsed() > budget {
                return 0;
            }
            for _ in 0..5 {
                match api.create(&PostParams::default(), &o).await {
                    Ok(_) => return 1,
                    Err(kube::Error::Api(s)) if s.code == 409 => return 1,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            0
        }
    }))
    .buffer_unordered(64)
    .fold(0, |a, b| async move { a + b })
    .await;
    (created, start.elapsed().as_secs_f64())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The webhook binary allocates with jemalloc; the child gets `_RJEM_MALLOC_CONF` as the
/// Deployment sets it (manifests/deployment.yaml: `dirty_decay_ms:0`), or
/// `BENCH_MALLOC_CONF` (empty for jemalloc's defaults).
fn malloc_conf() -> Option<String> {
    match std::env::var("BENCH_MALLOC_CONF") {
        Ok(v) if v.is_empty() => None,
        Ok(v) => Some(v),
        Err(_) => Some("dirty_decay_ms:0".into()),
    }
}

/// Resident memory of one webhook child, in MiB.
#[derive(Debug, Clone, Copy)]
struct Rss {
    /// One second after it became ready (its caches just listed).
    listed: f64,
    /// After `BENCH_RSS_SETTLE_SECS` (default 15: past the allocator's 10 s decay).
    steady: f64,
    /// VmHWM.
    peak: f64,
    /// Seconds from start to ready.
    ready_s: f64,
}

/// Starts `cape-static-ip serve` as a child (with `_RJEM_MALLOC_CONF=conf` when given),
/// waits for /readyz, and reads its resident memory just after and once settled.
async fn child_rss(binary: &Path, kubeconfig: &Path, certs: &Path, conf: Option<&str>) -> Rss {
    let admin = free_port();
    let start = Instant::now();
    let mut command = std::process::Command::new(binary);
    command.env_remove("_RJEM_MALLOC_CONF");
    if let Some(v) = conf {
        command.env("_RJEM_MALLOC_CONF", v);
    }
    let mut child = command
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .arg("--tls-cert-file")
        .arg(certs.join("tls.crt"))
        .arg("--tls-key-file")
        .arg(certs.join("tls.key"))
        .args(["--claim-grace", "1h", "--resync", "1h"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting {}: {e} (build it with cargo build --release)",
                binary.display()
            )
        });
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..1200 {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        let _ = child.kill();
        panic!("the webhook child never became ready");
    }
    let ready_s = start.elapsed().as_secs_f64();
    let pid = child.id();
    let mib = |key: &str| -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listed = mib("VmRSS:");
    let settle = env_usize("BENCH_RSS_SETTLE_SECS", 15).saturating_sub(1) as u64;
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let out = Rss {
        listed,
        steady: mib("VmRSS:"),
        peak: mib("VmHWM:"),
        ready_s,
    };
    let _ = child.kill();
    let _ = child.wait();
    out
}

/// `BENCH_ONLY=relist`: the webhook's resident memory, steady and at its peak, with
/// `BENCH_MEM_OBJECTS` IPAM objects in the cluster (half IPAddresses, half IPClaims), measured
/// at 100,000 and at `BENCH_MEM_OBJECTS` when larger. Each figure is a fresh child started with
/// the objects present: its first list is a full relist, and VmHWM is its peak. Nothing else runs.
async fn relist_only(
    client: &Client,
    binary: &Path,
    kubeconfig: &Path,
    certs: &Path,
    objects: usize,
) {
    // Small enough that a pool's status.indexes fits in one write (about 25 B per entry).
    const PER_POOL: usize = 40_000;
    let ns = temp_namespace(client, "bench-relist").await;
    let addrs = dynamic(
        client,
        &ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPAddress",
        "ipaddresses",
    );
    let claims = dynamic(
        client,
        &ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPClaim",
        "ipclaims",
    );
    let budget = Duration::from_secs(env_usize("BENCH_FILL_BUDGET_SECS", 1800) as u64);
    let idle = child_rss(binary, kubeconfig, certs, malloc_conf().as_deref()).await;
    let (rss_idle, hwm_idle) = (idle.steady, idle.peak);
    let mut rows = vec![("0 (idle)".to_string(), 0.0, rss_idle, hwm_idle, 0.0)];
    let (mut made, mut pools) = (0usize, 0usize);
    let start = Instant::now();
    for step in [100_000.min(objects), objects] {
        if step <= made {
            continue;
        }
        // Addresses first (pool by pool, one /16 each), then as many claims.
        let want_addrs = step / 2;
        let from = made / 2;
        while pools * PER_POOL < want_addrs {
            let name = format!("p{pools}");
            let subnet = format!("10.{}.0.0/16", 100 + pools);
            create(
                client,
                &ns,
                pool(
                    &name,
                    json!({
                        "namePrefix": name, "pools": [{"subnet": subnet}], "prefix": 16,
                        "gateway": subnet.replace("0.0/16", "0.1"), "dnsServers": ["10.255.0.2"]
                    }),
                    json!({}),
                ),
            )
            .await
            .unwrap();
            pools += 1;
        }
        let left = budget.saturating_sub(start.elapsed());
        let ns2 = ns.clone();
        let (a, a_s) = fill(&addrs, want_addrs - from, left, |j| {
            let i = from + j;
            let p = i / PER_POOL;
            let raw =
                u32::from(std::net::Ipv4Addr::new(10, 100 + p as u8, 0, 2)) + (i % PER_POOL) as u32;
            let ip = std::net::Ipv4Addr::from(raw).to_string();
            json!({
                "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPAddress",
                "metadata": {"name": format!("r-{}", ip.replace('.', "-")), "namespace": ns2},
                "spec": {"address": ip, "prefix": 16, "gateway": format!("10.{}.0.1", 100 + p),
                         "pool": {"name": format!("p{p}"), "namespace": ns2},
                         "claim": {"name": format!("c-{i:06}"), "namespace": ns2}}
            })
        })
        .await;
        let left = budget.saturating_sub(start.elapsed());
        let ns2 = ns.clone();
        let (c, c_s) = fill(&claims, want_addrs - from, left, |j| {
            let i = from + j;
            json!({
                "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPClaim",
                "metadata": {"name": format!("c-{i:06}"), "namespace": ns2},
                "spec": {"pool": {"name": format!("p{}", i / PER_POOL), "namespace": ns2}}
            })
        })
        .await;
        made += a + c;
        eprintln!(
            "bench: {a} IPAddresses in {a_s:.0} s, {c} IPClaims in {c_s:.0} s: {made} IPAM objects"
        );
        let Rss {
            steady: rss,
            peak: hwm,
            ready_s,
            ..
        } = child_rss(binary, kubeconfig, certs, malloc_conf().as_deref()).await;
        eprintln!("bench: {made} objects, no status.indexes: RSS {rss:.1} MiB, peak {hwm:.1} MiB");
        let per = |rss: f64| (rss - rss_idle) * 1024.0 / made as f64;
        rows.push((
            format!("{made}, pools without status.indexes"),
            ready_s,
            rss,
            hwm,
            per(rss),
        ));
        // What the webhook's pool status loop writes: claim -> address of every address.
        let ippools = dynamic(
            client,
            &ns,
            "ipam.metal3.io",
            "v1alpha1",
            "IPPool",
            "ippools",
        );
        for p in 0..pools {
            let indexes: serde_json::Map<String, Value> = (p * PER_POOL
                ..((p + 1) * PER_POOL).min(made / 2))
                .map(|i| {
                    let raw = u32::from(std::net::Ipv4Addr::new(10, 100 + p as u8, 0, 2))
                        + (i % PER_POOL) as u32;
                    (
                        format!("c-{i:06}"),
                        json!(std::net::Ipv4Addr::from(raw).to_string()),
                    )
                })
                .collect();
            let patch = json!({"status": {"indexes": indexes}});
            ippools
                .patch_status(
                    &format!("p{p}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .unwrap();
        }
        let Rss {
            steady: rss,
            peak: hwm,
            ready_s,
            ..
        } = child_rss(binary, kubeconfig, certs, malloc_conf().as_deref()).await;
        eprintln!(
            "bench: {made} objects: RSS {rss:.1} MiB, peak {hwm:.1} MiB, ready in {ready_s:.1} s"
        );
        rows.push((made.to_string(), ready_s, rss, hwm, per(rss)));
    }
    println!();
    println!(
        "| IPAM objects cached | steady RSS MiB | peak RSS (VmHWM) MiB | ready s | KiB/object over idle |"
    );
    println!("|---|---|---|---|---|");
    for (n, ready_s, rss, hwm, per) in &rows {
        println!("| {n} | {rss:.1} | {hwm:.1} | {ready_s:.1} | {per:.2} |");
    }
    println!("(webhook binary {})", binary.display());
    // `BENCH_HOLD_SECS`: the objects stay (the control plane runs) this long, for a profiler.
    let hold = env_usize("BENCH_HOLD_SECS", 0);
    if hold > 0 {
        eprintln!(
            "bench: holding {hold} s: KUBECONFIG={} certs {}",
            kubeconfig.display(),
            certs.display()
        );
        tokio::time::sleep(Duration::from_secs(hold as u64)).await;
    }
}

/// Criterion's estimates (mean, ns) of the allocator benchmarks, when they ran.
/// Where the CPU goes during one extra, unmeasured burst of 300 at concurrency 20: a
/// system-wide `perf record` (when perf is installed and allowed; `BENCH_PROFILE=0` skips it),
/// summed by process. The webhook and the load generator share this process.
async fn cpu_split(client: &Client, hook: &InProcess, ns: &str, target: &Path) -> Option<String> {
    if std::env::var("BENCH_PROFILE").is_ok_and(|v| v == "0") {
        return None;
    }
    let _ = std::fs::create_dir_all(target.join("bench"));
    let data = target.join("bench/perf.data");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-a", "-F", "499", "-o"])
        .arg(&data)
        .args(["--", "sleep", "120"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = burst(client, hook, ns, "profile", 300, 20).await;
    let _ = std::process::Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
    let report = std::process::Command::new("perf")
        .args(["report", "--sort", "comm", "--stdio", "-i"])
        .arg(&data)
        .output()
        .ok()?;
    let mut by: Vec<(String, f64)> = Vec::new();
    for line in String::from_utf8_lossy(&report.stdout).lines() {
        let mut parts = line.split_whitespace();
        let (Some(pct), Some(comm)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pct) = pct.trim_end_matches('%').parse::<f64>() else {
            continue;
        };
        let who = match comm {
            "swapper" => "idle",
            "kube-apiserver" => "kube-apiserver",
            "etcd" => "etcd",
            c if c.starts_with("tokio-rt") || c == "bench" => "webhook + load generator",
            _ => "other",
        };
        match by.iter_mut().find(|(w, _)| w == who) {
            Some((_, p)) => *p += pct,
            None => by.push((who.to_string(), pct)),
        }
    }
    if by.is_empty() {
        return None;
    }
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some(
        by.iter()
            .map(|(w, p)| format!("{w} {p:.0}%"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

fn criterion_results(target: &Path) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut stack = vec![target.join("criterion")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.ends_with("new/benchmark.json") {
                let read = |f: &Path| -> Option<Value> {
                    serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok()
                };
                if let (Some(b), Some(est)) = (read(&p), read(&p.with_file_name("estimates.json")))
                    && let (Some(id), Some(mean)) = (
                        b["full_id"].as_str(),
                        est["mean"]["point_estimate"].as_f64(),
                    )
                {
                    out.push((id.to_string(), mean));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[tokio::main]
async fn main() {
    let t0 = Instant::now();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let binary = std::env::var("BENCH_WEBHOOK_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target.join("release/cape-static-ip"));
    let mem_objects = env_usize("BENCH_MEM_OBJECTS", 100_000);
    let prefill = env_usize("BENCH_PREFILL", 60_000).min(65_000);
    let budget = Duration::from_secs(env_usize("BENCH_FILL_BUDGET_SECS", 240) as u64);

    if std::env::var("RUST_LOG").is_ok() {
        cape_static_ip::cmd::serve::init_logging(cape_static_ip::cli::LogFormat::Text);
    }
    eprintln!("bench: starting the control plane");
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let (certs, ca_pem) = dev_certs("bench");
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "relist") {
        relist_only(&client, &binary, cp.kubeconfig(), &certs, mem_objects).await;
        let _ = std::fs::remove_dir_all(&certs);
        return;
    }
    let conf = malloc_conf();
    let requests_only = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "requests");
    let rss_idle = if requests_only {
        f64::NAN
    } else {
        child_rss(&binary, cp.kubeconfig(), &certs, conf.as_deref())
            .await
            .steady
    };
    eprintln!("bench: webhook idle RSS {rss_idle:.1} MiB");

    let hook = start_webhook(&cp.client().await, &certs).await;
    let empty_ns = temp_namespace(&client, "bench-empty").await;
    let full_ns = temp_namespace(&client, "bench-full").await;
    let floor_ns = temp_namespace(&client, "bench-floor").await;
    let mem_ns = temp_namespace(&client, "bench-mem").await;
    for (ns, name, subnet) in [
        (&empty_ns, "empty", "10.0.0.0/16"),
        (&full_ns, "full", "10.1.0.0/16"),
    ] {
        create(&client, ns, pool(name, json!({
            "namePrefix": name,
            "pools": [{"subnet": subnet}],
            "prefix": 16, "gateway": subnet.replace("0.0/16", "0.1"), "dnsServers": ["10.255.0.2"]
        }), json!({}))).await.unwrap();
        create(
            &client,
            ns,
            template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": name})),
        )
        .await
        .unwrap();
        register(&client, &hook, &ca_pem, ns, true).await;
    }
    create(&client, &floor_ns, template("tpl", json!({})))
        .await
        .unwrap();

    // Warm-up (connections on every path, caches, allocator): not measured.
    let _ = burst(&client, &hook, &empty_ns, "warm", 50, 50).await;
    let _ = floor(&client, &floor_ns, "fwarm", 60_000, 50, 50).await;

    // Requests per machine (create, floor, delete) on a pool of their own.
    let req_ns = temp_namespace(&client, "bench-requests").await;
    create(
        &client,
        &req_ns,
        pool(
            "requests",
            json!({
                "namePrefix": "requests", "pools": [{"subnet": "10.2.0.0/16"}],
                "prefix": 16, "gateway": "10.2.0.1", "dnsServers": ["10.255.0.2"]
            }),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &client,
        &req_ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "requests"})),
    )
    .await
    .unwrap();
    register(&client, &hook, &ca_pem, &req_ns, true).await;
    let _ = burst(&client, &hook, &req_ns, "warm", 20, 20).await;
    eprintln!("bench: counting requests per machine (100 @ 20: create, floor, delete)");
    let requests = count_requests(&client, &req_ns, &floor_ns, 100, 20).await;
    if requests_only {
        let mut rows: Vec<(String, String, String)> = Vec::new();
        request_rows(&requests, &mut |m, v, t| rows.push((m, v, t.to_string())));
        print_table(&rows);
        let report = json!({
            "requests": requests,
            "table": rows.iter().map(|(m, v, t)| json!({"metric": m, "value": v, "target": t})).collect::<Vec<_>>(),
            "seconds": t0.elapsed().as_secs_f64(),
        });
        write_report(&target, &report);
        let _ = std::fs::remove_dir_all(&certs);
        return;
    }

    eprintln!("bench: bursts on the empty /16, each followed by its floor ({ROUNDS} rounds)");
    let (empty_a, floor_a) = rounds(
        &client,
        &hook,
        &empty_ns,
        "a",
        100,
        20,
        Some((&floor_ns, 0)),
    )
    .await;
    let (empty_b, floor_b) = rounds(
        &client,
        &hook,
        &empty_ns,
        "b",
        200,
        50,
        Some((&floor_ns, 1000)),
    )
    .await;
    let empty = [empty_a, empty_b];
    let floors = [floor_a.expect("floor"), floor_b.expect("floor")];

    let profile = cpu_split(&client, &hook, &empty_ns, &target).await;

    let lives = machine_lives(&client, &hook, &ca_pem).await;

    eprintln!("bench: pre-filling {prefill} addresses of the second /16 at 64 in flight");
    let addrs = dynamic(
        &client,
        &full_ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPAddress",
        "ipaddresses",
    );
    let fns = full_ns.clone();
    let (filled, fill_s) = fill(&addrs, prefill, budget, |i| {
        let raw = u32::from(std::net::Ipv4Addr::new(10, 1, 0, 2)) + i as u32;
        let ip = std::net::Ipv4Addr::from(raw).to_string();
        json!({
            "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPAddress",
            "metadata": {"name": format!("full-{}", ip.replace('.', "-")), "namespace": fns},
            "spec": {"address": ip, "prefix": 16, "gateway": "10.1.0.1",
                     "pool": {"name": "full", "namespace": fns},
                     "claim": {"name": format!("prefill-{i}"), "namespace": fns}}
        })
    })
    .await;
    let fill_rate = filled as f64 / fill_s;
    eprintln!("bench: {filled} addresses in {fill_s:.1} s ({fill_rate:.0}/s)");
    let key = PoolKey {
        namespace: full_ns.clone(),
        name: "full".into(),
    };
    for _ in 0..600 {
        let used = hook
            .state
            .assigner
            .caches
            .index
            .with_pool(&key, |s| s.used())
            .unwrap_or(0);
        if used >= filled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = burst(&client, &hook, &full_ns, "warm", 50, 50).await;
    eprintln!("bench: bursts on the filled /16 ({ROUNDS} rounds)");
    let full = [
        rounds(&client, &hook, &full_ns, "a", 100, 20, None).await.0,
        rounds(&client, &hook, &full_ns, "b", 200, 50, None).await.0,
    ];

    // IPAM objects in the cluster now: the pre-fill, 2 per machine admitted, 2 per floor chain.
    let admitted: usize = ROUNDS
        * empty
            .iter()
            .chain(full.iter())
            .map(|b| b.machines)
            .sum::<usize>()
        + 100
        + 300;
    let existing = filled + 2 * admitted + 2 * (ROUNDS * 300 + 50);
    let wanted = mem_objects.saturating_sub(existing);
    let left = budget.saturating_sub(Duration::from_secs_f64(fill_s));
    eprintln!("bench: creating {wanted} IPClaims for the memory figure (budget {left:?})");
    let claims = dynamic(
        &client,
        &mem_ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPClaim",
        "ipclaims",
    );
    let mns = mem_ns.clone();
    let (claims_made, claims_s) = fill(&claims, wanted, left, |i| {
        json!({
            "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPClaim",
            "metadata": {"name": format!("mem-{i:06}"), "namespace": mns},
            "spec": {"pool": {"name": "full", "namespace": full_ns}}
        })
    })
    .await;
    let cached = existing + claims_made;
    eprintln!("bench: {claims_made} claims in {claims_s:.1} s; {cached} IPAM objects");
    let loaded = child_rss(&binary, cp.kubeconfig(), &certs, conf.as_deref()).await;
    let (rss_loaded, hwm_loaded, ready_s) = (loaded.steady, loaded.peak, loaded.ready_s);
    let per_object_kib = (rss_loaded - rss_idle) * 1024.0 / cached as f64;
    let rss_100k = if cached >= 100_000 {
        rss_loaded
    } else {
        rss_idle + per_object_kib * 100_000.0 / 1024.0
    };
    let micro = criterion_results(&target);

    // ---- the table ----
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut row = |m: String, v: String, t: &str| rows.push((m, v, t.to_string()));
    // The ratio of the median round's p99 (one disturbed round does not decide it), and of the
    // p99 over all rounds.
    let ratio_p99 =
        [0, 1].map(|i| median(&full[i].rounds_p99_ms) / median(&empty[i].rounds_p99_ms));
    let ratio_pooled = [0, 1].map(|i| full[i].admission_ms[2] / empty[i].admission_ms[2]);
    for (label, bursts) in [
        ("empty /16", &empty),
        (&*format!("/16 with {filled} used"), &full),
    ] {
        for b in bursts.iter() {
            let tag = format!("{label}, {} @ {}", b.machines, b.concurrency);
            row(
                format!("admission p50/p90/p99 ms ({tag})"),
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    b.admission_ms[0], b.admission_ms[1], b.admission_ms[2]
                ),
                "p99 <= 25",
            );
            row(
                "  same, from the webhook's histogram".to_string(),
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    b.admission_hist_ms[0], b.admission_hist_ms[1], b.admission_hist_ms[2]
                ),
                "",
            );
            row(
                format!("create p50/p99 ms, client ({tag})"),
                format!("{:.1} / {:.1}", b.create_ms[0], b.create_ms[1]),
                "",
            );
            row(
                format!("machines/s ({tag})"),
                format!(
                    "{:.1} (rounds {}){}",
                    b.machines_per_s,
                    rounds_text(&b.rounds_per_s),
                    if b.failures > 0 {
                        format!(" ({} failed)", b.failures)
                    } else {
                        String::new()
                    }
                ),
                if b.machines == 100 && label == "empty /16" {
                    ">= 120"
                } else {
                    ""
                },
            );
        }
    }
    for (i, f) in floors.iter().enumerate() {
        row(
            format!(
                "floor machines/s (4 bare writes, {} @ {})",
                f.machines, f.concurrency
            ),
            format!(
                "{:.1} (rounds {}; chain p50/p99 {:.1} / {:.1} ms)",
                f.machines_per_s,
                rounds_text(&f.rounds_per_s),
                f.chain_ms[0],
                f.chain_ms[1]
            ),
            "",
        );
        row(
            format!("  ours / floor ({} @ {})", f.machines, f.concurrency),
            format!(
                "{:.0} %",
                100.0 * empty[i].machines_per_s / f.machines_per_s
            ),
            ">= 80 %",
        );
    }
    for i in 0..2 {
        row(
            format!(
                "full/empty admission p99, median round ({} @ {})",
                empty[i].machines, empty[i].concurrency
            ),
            format!(
                "{:.2}x (rounds: empty {} ms, full {} ms; over all rounds {:.2}x)",
                ratio_p99[i],
                rounds_text(&empty[i].rounds_p99_ms),
                rounds_text(&full[i].rounds_p99_ms),
                ratio_pooled[i]
            ),
            "<= 1.2x",
        );
    }
    row(
        format!("pre-fill {filled} IPAddresses @ 64"),
        format!("{fill_s:.1} s ({fill_rate:.0}/s)"),
        "",
    );
    if let Some(split) = &profile {
        row(
            "CPU by process during a 300 @ 20 burst (perf)".into(),
            split.clone(),
            "",
        );
    }
    row("webhook RSS idle".into(), format!("{rss_idle:.1} MiB"), "");
    let conf_text = match &conf {
        Some(v) => format!("jemalloc, _RJEM_MALLOC_CONF={v}"),
        None => "jemalloc".into(),
    };
    row(
        format!("webhook RSS, {cached} IPAM objects cached ({conf_text})"),
        format!(
            "{rss_loaded:.1} MiB steady (1 s after ready {:.1}, peak {hwm_loaded:.1}; ready in {ready_s:.1} s)",
            loaded.listed
        ),
        "",
    );
    row(
        if cached >= 100_000 {
            "webhook RSS at 100k IPAM objects".into()
        } else {
            format!(
                "webhook RSS at 100k IPAM objects (EXTRAPOLATED from {cached}, {per_object_kib:.2} KiB/object)"
            )
        },
        format!("{rss_100k:.1} MiB"),
        "<= 100 MiB",
    );
    for (label, n, calls) in &lives {
        let per: f64 = life::total(calls) as f64 / *n as f64;
        row(
            format!("admission calls per machine life, {label} ({n} lives)"),
            format!("{per:.2} ({calls:?})"),
            "",
        );
    }
    for (id, ns) in &micro {
        row(format!("allocator {id}"), format!("{:.0} ns", ns), "");
    }
    request_rows(&requests, &mut row);
    print_table(&rows);
    println!(
        "\n(total {:.0} s on {} CPUs)",
        t0.elapsed().as_secs_f64(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let report = json!({
        "requests": requests,
        "bursts_empty": empty, "bursts_full": full, "floor": floors,
        "prefill": {"addresses": filled, "seconds": fill_s},
        "machine_lives": lives.iter().map(|(label, n, calls)| json!({"registration": label, "machines": n, "admission_calls": calls})).collect::<Vec<_>>(),
        "rss_mib": {"idle": rss_idle, "loaded": rss_loaded, "loaded_peak": hwm_loaded,
                    "loaded_just_listed": loaded.listed, "malloc_conf": conf,
                    "loaded_objects": cached, "at_100k": rss_100k, "extrapolated": cached < 100_000},
        "allocator_ns": micro.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "table": rows.iter().map(|(m, v, t)| json!({"metric": m, "value": v, "target": t})).collect::<Vec<_>>(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    write_report(&target, &report);
    let _ = std::fs::remove_dir_all(&certs);
}

fn print_table(rows: &[(String, String, String)]) {
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(10);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(10);
    println!();
    println!("| {:w0$} | {:w1$} | target |", "metric", "value");
    println!("|{}|{}|--------|", "-".repeat(w0 + 2), "-".repeat(w1 + 2));
    for (m, v, t) in rows {
        println!("| {m:w0$} | {v:w1$} | {t} |");
    }
}

/// Writes the report to `target/bench/bench-<unix time>.json` and `target/bench/latest.json`.
fn write_report(target: &Path, report: &Value) {
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let text = serde_json::to_string_pretty(report).unwrap();
    std::fs::write(dir.join(format!("bench-{stamp}.json")), &text).unwrap();
    std::fs::write(dir.join("latest.json"), &text).unwrap();
    println!("wrote {}", dir.join("latest.json").display());
}
