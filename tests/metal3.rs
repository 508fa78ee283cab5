//! Beside metal3's own IPAM controller (ip-address-manager v1.13.2, really running against the
//! real control plane): it reconciles every IPClaim of a pool, ours included. These tests prove
//! that it never gives one of our claims a second address, that we never take one of its
//! addresses, that a pool filled by both writers ends cleanly, and that `status.indexes` ends
//! up true.
//!
//! metal3 rebuilds a pool's allocations from the IPAddresses in its cache on every pass; a claim
//! without `status.address` whose IPAddress it has not cached yet gets a *new* address (it logs
//! "Getting address" for it first). Our claims are therefore checked object by object and in
//! metal3's own log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::controlplane::{CrdSet, shared, temp_namespace};
use common::metal3;
use common::webhook::{
    self, WebhookOptions, capi_machine, create, dynamic, machines, pool, template,
};
use kube::api::ListParams;
use serde_json::{Value, json};

const POOL: &str = "shared-pool";
/// 10.20.0.10 – 10.20.0.59: 50 addresses.
const POOL_START: &str = "10.20.0.10";
const POOL_END: &str = "10.20.0.59";
const POOL_SIZE: usize = 50;
const METAL3_CLAIM_FINALIZER: &str = "ipclaim.ipam.metal3.io";
/// What metal3 logs at the start of every pass over a pool.
const METAL3_PASS: &str = "\"Fetching IPAddress objects\"";

async fn list(client: &kube::Client, ns: &str, kind: &str, plural: &str) -> Vec<Value> {
    dynamic(client, ns, "ipam.metal3.io", "v1alpha1", kind, plural)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| serde_json::to_value(o).unwrap())
        .collect()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

/// Everything metal3-shaped in the namespace, read live.
struct Snapshot {
    /// IPAddress name → (address, claim name).
    addresses: BTreeMap<String, (String, String)>,
    /// IPClaim name → the claim.
    claims: BTreeMap<String, Value>,
    pool: Value,
}

async fn snapshot(client: &kube::Client, ns: &str) -> Snapshot {
    let addresses = list(client, ns, "IPAddress", "ipaddresses")
        .await
        .iter()
        .map(|a| {
            (
                name(a).to_owned(),
                (
                    a["spec"]["address"].as_str().unwrap_or_default().to_owned(),
                    a["spec"]["claim"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ),
            )
        })
        .collect();
    let claims = list(client, ns, "IPClaim", "ipclaims")
        .await
        .into_iter()
        .map(|c| (name(&c).to_owned(), c))
        .collect();
    let pool = list(client, ns, "IPPool", "ippools")
        .await
        .into_iter()
        .find(|p| name(p) == POOL)
        .expect("the pool");
    Snapshot {
        addresses,
        claims,
        pool,
    }
}

impl Snapshot {
    /// Address (IP) of the IPAddress a claim's `status.address` names.
    fn claim_ip(&self, claim: &str) -> Option<&str> {
        let c = self.claims.get(claim)?;
        let a = c["status"]["address"]["name"].as_str()?;
        self.addresses.get(a).map(|(ip, _)| ip.as_str())
    }
    /// claim → IP, from the IPAddress objects.
    fn allocations(&self) -> BTreeMap<String, String> {
        self.addresses
            .values()
            .map(|(ip, claim)| (claim.clone(), ip.clone()))
            .collect()
    }
}

/// Creates ElfMachines concurrently through the apiserver; returns name → result (the IP, or
/// the denial).
async fn create_machines(
    client: &kube::Client,
    ns: &str,
    names: &[String],
) -> BTreeMap<String, Result<String, kube::Error>> {
    let creates = names.iter().map(|n| {
        let client = client.clone();
        let ns = ns.to_owned();
        let n = n.clone();
        async move {
            let r = create(
                &client,
                &ns,
                capi_machine(
                    &n,
                    "worker",
                    json!([{"networkType": "IPV4", "vlan": "vlan-1"}]),
                ),
            )
            .await
            .map(|m| {
                let m = serde_json::to_value(m).unwrap();
                m["spec"]["network"]["devices"][0]["ipAddrs"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            });
            (n, r)
        }
    });
    futures::future::join_all(creates)
        .await
        .into_iter()
        .collect()
}

/// Creates IPClaims on the pool by hand, as any metal3 user would (no webhook involved).
async fn create_metal3_claims(client: &kube::Client, ns: &str, names: &[String]) {
    let creates = names.iter().map(|n| {
        create(
            client,
            ns,
            json!({
                "apiVersion": "ipam.metal3.io/v1alpha1",
                "kind": "IPClaim",
                "metadata": {"name": n},
                "spec": {"pool": {"name": POOL, "namespace": ns}}
            }),
        )
    });
    for r in futures::future::join_all(creates).await {
        r.expect("creating an IPClaim by hand");
    }
}

/// Polls `f` every 100 ms until it returns Some, or panics after `timeout` with `what`.
async fn wait_for<T, F, Fut>(timeout: Duration, what: impl Fn() -> String, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if t0.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {}", what());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines of metal3's log where it looked for a *new* address for one of `claims` (it does so
/// only when the claim is not in the allocations it rebuilt from its cache).
/// metal3's log lines where it allocated, for one of our claims (claim → our address), an
/// address other than ours. Our claims name their address in metal3's `ipAddress`
/// annotation, so metal3 may "allocate" exactly that one (its create then finds our
/// IPAddress); any other address would be a second address for the claim.
fn metal3_allocations_for(m: &metal3::Metal3, claims: &BTreeMap<String, String>) -> Vec<String> {
    m.log_lines("\"Address allocated\"")
        .into_iter()
        .filter(|l| {
            claims.iter().any(|(c, ip)| {
                l.contains(&format!("Claim=\"{c}\"")) && !l.contains(&format!("address=\"{ip}\""))
            })
        })
        .collect()
}

async fn wait_for_pool_in_cache(hook: &webhook::Webhook, ns: &str) {
    let key = cape_static_ip::ipam::select::PoolKey {
        namespace: ns.into(),
        name: POOL.into(),
    };
    wait_for(
        Duration::from_secs(20),
        || format!("pool {ns}/{POOL} in the webhook's cache"),
        || async {
            hook.running
                .state
                .assigner
                .caches
                .index
                .with_pool(&key, |_| ())
                .ok()
        },
    )
    .await
}

/// Asserts every one of our machines' claims names, through `status.address`, the IPAddress of
/// the machine's IP, and that this IPAddress points back at the claim.
fn assert_ours_intact(s: &Snapshot, ns: &str, ours: &BTreeMap<String, String>) {
    for (machine, ip) in ours {
        let claim = format!("{ns}-{machine}-0");
        assert!(
            s.claims.contains_key(&claim),
            "claim {claim} of {machine} is missing"
        );
        assert_eq!(
            s.claim_ip(&claim),
            Some(ip.as_str()),
            "claim {claim} of {machine} ({ip}) names another address: {:#}",
            s.claims[&claim]
        );
        let holders: Vec<_> = s
            .addresses
            .iter()
            .filter(|(_, (_, c))| *c == claim)
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "claim {claim} of {machine} ({ip}) holds {} IPAddresses: {holders:?}",
            holders.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metal3_controller_never_reassigns_our_claims_and_we_never_take_its_addresses() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let m3 = metal3::start(cp);
    eprintln!(
        "metal3 ip-address-manager pid {} healthy, workers started in {:?} (log: {})",
        m3.pid(),
        m3.started_in,
        m3.log().display()
    );
    let t_test = Instant::now();

    let ns = temp_namespace(&client, "metal3").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    create(
        &client,
        &ns,
        pool(
            POOL,
            json!({
                "namePrefix": POOL,
                "pools": [{"start": POOL_START, "end": POOL_END}],
                "prefix": 24, "gateway": "10.20.0.1", "dnsServers": ["10.20.0.2"]
            }),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &client,
        &ns,
        template("worker", json!({"cluster.x-k8s.io/ip-pool-name": POOL})),
    )
    .await
    .unwrap();
    wait_for_pool_in_cache(&hook, &ns).await;

    // ---- 1. Ours: 30 machines at once; metal3 reconciles their claims meanwhile.
    let names: Vec<String> = (0..30).map(|i| format!("ours-{i:02}")).collect();
    let passes_before = m3.log_lines(METAL3_PASS).len();
    let t = Instant::now();
    let mut ours: BTreeMap<String, String> = BTreeMap::new();
    for (m, r) in create_machines(&client, &ns, &names).await {
        let ip = r.unwrap_or_else(|e| panic!("creating {m}: {e}"));
        ours.insert(m, ip);
    }
    eprintln!("30 machines admitted in {:?}", t.elapsed());
    let our_claims: BTreeSet<String> = ours.keys().map(|m| format!("{ns}-{m}-0")).collect();
    let our_ips: BTreeSet<String> = ours.values().cloned().collect();
    assert_eq!(our_ips.len(), 30, "duplicate addresses: {ours:?}");

    // metal3 has caught up when the pool's status.indexes covers every one of our claims (metal3
    // recomputes it from its IPAddress cache on each pass; our sweeper writes it too) and
    // metal3 has made passes over the pool since our writes began. It cannot be told by its
    // finalizer: metal3 skips a claim that already has status.address, so only the claims it
    // saw in the instant between our create and our status write get `ipclaim.ipam.metal3.io`.
    // Phases 2 and 3 check our claims again, after many more metal3 passes.
    let t = Instant::now();
    wait_for(
        Duration::from_secs(30),
        || format!("metal3 to pass over our 30 claims in {ns}/{POOL}"),
        || async {
            let s = snapshot(&client, &ns).await;
            let idx = s.pool["status"]["indexes"].as_object().cloned()?;
            (our_claims.iter().all(|c| idx.contains_key(c))
                && m3.log_lines(METAL3_PASS).len() >= passes_before + 2)
                .then_some(())
        },
    )
    .await;
    eprintln!("metal3 passed over our 30 claims within {:?}", t.elapsed());
    // Let any reconcile already queued run out before judging.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = snapshot(&client, &ns).await;
    let with_finalizer = our_claims
        .iter()
        .filter(|c| {
            s.claims[*c]["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == METAL3_CLAIM_FINALIZER))
        })
        .count();
    eprintln!(
        "{with_finalizer} of our 30 claims carry metal3's finalizer (metal3 skips claims that \
         already have status.address; it finalizes those it saw before we set it)"
    );
    let claim_ips: BTreeMap<String, String> = ours
        .iter()
        .map(|(m, ip)| (format!("{ns}-{m}-0"), ip.clone()))
        .collect();
    let reassigned = metal3_allocations_for(&m3, &claim_ips);
    assert!(
        reassigned.is_empty(),
        "metal3 allocated another address for our claims:\n{}",
        reassigned.join("\n")
    );
    assert_eq!(
        s.addresses.len(),
        30,
        "IPAddresses after our 30 machines: {:#?}",
        s.addresses
    );
    for (a, (ip, claim)) in &s.addresses {
        assert!(
            our_ips.contains(ip),
            "IPAddress {a} ({ip}, claim {claim}) is not one of ours"
        );
    }
    assert_ours_intact(&s, &ns, &ours);

    // ---- 2. Its claims: 10 IPClaims made by hand, then 5 more machines.
    let hand: Vec<String> = (0..10).map(|i| format!("hand-{i:02}")).collect();
    create_metal3_claims(&client, &ns, &hand).await;
    let t = Instant::now();
    let metal3_ips: BTreeMap<String, String> = wait_for(
        Duration::from_secs(30),
        || "metal3 to give its 10 claims an address".into(),
        || async {
            let s = snapshot(&client, &ns).await;
            hand.iter()
                .map(|c| s.claim_ip(c).map(|ip| (c.clone(), ip.to_owned())))
                .collect::<Option<BTreeMap<_, _>>>()
        },
    )
    .await;
    eprintln!("metal3 served its 10 claims in {:?}", t.elapsed());
    let metal3_set: BTreeSet<&String> = metal3_ips.values().collect();
    assert_eq!(metal3_set.len(), 10, "metal3 duplicated: {metal3_ips:?}");
    for (c, ip) in &metal3_ips {
        assert!(
            !our_ips.contains(ip),
            "metal3 gave {c} our address {ip} (held by {:?})",
            ours.iter().find(|(_, i)| *i == ip)
        );
    }

    let more: Vec<String> = (30..35).map(|i| format!("ours-{i:02}")).collect();
    for (m, r) in create_machines(&client, &ns, &more).await {
        let ip = r.unwrap_or_else(|e| panic!("creating {m}: {e}"));
        assert!(
            !metal3_set.contains(&ip),
            "{m} was given {ip}, metal3's address for {:?}",
            metal3_ips.iter().find(|(_, i)| **i == ip)
        );
        assert!(!our_ips.contains(&ip), "{m} was given {ip} twice");
        ours.insert(m, ip);
    }
    let s = snapshot(&client, &ns).await;
    let distinct: BTreeSet<&String> = s.addresses.values().map(|(ip, _)| ip).collect();
    assert_eq!(
        s.addresses.len(),
        45,
        "IPAddresses after 35 machines and 10 metal3 claims: {:#?}",
        s.addresses
    );
    assert_eq!(distinct.len(), s.addresses.len(), "{:#?}", s.addresses);
    assert_ours_intact(&s, &ns, &ours);

    // ---- 3. Both writers fill the rest of the pool at once; then it is full for both.
    let last_hand: Vec<String> = (10..13).map(|i| format!("hand-{i:02}")).collect();
    let last_ours: Vec<String> = (35..37).map(|i| format!("ours-{i:02}")).collect();
    let (_, results) = tokio::join!(
        create_metal3_claims(&client, &ns, &last_hand),
        create_machines(&client, &ns, &last_ours)
    );
    for (m, r) in results {
        let ip = r.unwrap_or_else(|e| panic!("creating {m} while the pool has room: {e}"));
        ours.insert(m, ip);
    }
    let all_hand: Vec<String> = hand.iter().chain(&last_hand).cloned().collect();
    let metal3_ips: BTreeMap<String, String> = wait_for(
        Duration::from_secs(30),
        || "metal3 to serve its last 3 claims".into(),
        || async {
            let s = snapshot(&client, &ns).await;
            all_hand
                .iter()
                .map(|c| s.claim_ip(c).map(|ip| (c.clone(), ip.to_owned())))
                .collect::<Option<BTreeMap<_, _>>>()
        },
    )
    .await;
    let s = snapshot(&client, &ns).await;
    assert_eq!(s.addresses.len(), POOL_SIZE, "{:#?}", s.addresses);
    let distinct: BTreeSet<&String> = s.addresses.values().map(|(ip, _)| ip).collect();
    assert_eq!(distinct.len(), POOL_SIZE);
    let ours_set: BTreeSet<&String> = ours.values().collect();
    assert_eq!(ours_set.len(), 37);
    for (c, ip) in &metal3_ips {
        assert!(!ours_set.contains(ip), "{c} and one of ours share {ip}");
    }

    let denied = create_machines(&client, &ns, &["ours-full".to_string()]).await;
    match &denied["ours-full"] {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 409, "{status:?}");
            assert!(
                status.message.contains("no free address") && status.message.contains(POOL),
                "{status:?}"
            );
        }
        other => panic!("a machine on a full pool: {other:?}"),
    }
    assert!(
        machines(&client, &ns)
            .get_opt("ours-full")
            .await
            .unwrap()
            .is_none(),
        "the denied machine exists"
    );
    create_metal3_claims(&client, &ns, &["hand-full".to_string()]).await;
    let error = wait_for(
        Duration::from_secs(30),
        || "metal3 to report its pool exhausted".into(),
        || async {
            let s = snapshot(&client, &ns).await;
            s.claims["hand-full"]["status"]["errorMessage"]
                .as_str()
                .map(str::to_owned)
        },
    )
    .await;
    assert_eq!(error, "Exhausted IP Pools");
    let s = snapshot(&client, &ns).await;
    assert_eq!(s.addresses.len(), POOL_SIZE, "{:#?}", s.addresses);
    assert!(
        !s.claims.contains_key(&format!("{ns}-ours-full-0")),
        "the denied machine left its claim"
    );
    assert_ours_intact(&s, &ns, &ours);
    let claim_ips: BTreeMap<String, String> = ours
        .iter()
        .map(|(m, ip)| (format!("{ns}-{m}-0"), ip.clone()))
        .collect();
    let reassigned = metal3_allocations_for(&m3, &claim_ips);
    assert!(
        reassigned.is_empty(),
        "metal3 allocated another address for our claims:\n{}",
        reassigned.join("\n")
    );

    // ---- 4. status.indexes (written by metal3 on every pass, and by us) ends up true:
    // claim → address for every IPAddress of the pool.
    let expected = s.allocations();
    assert_eq!(expected.len(), POOL_SIZE);
    wait_for(
        Duration::from_secs(30),
        || {
            format!(
                "{ns}/{POOL} status.indexes to equal claim → address for all {POOL_SIZE} IPAddresses"
            )
        },
        || async {
            let s = snapshot(&client, &ns).await;
            let idx: BTreeMap<String, String> =
                serde_json::from_value(s.pool["status"]["indexes"].clone()).ok()?;
            (idx == expected).then_some(())
        },
    )
    .await;

    assert!(
        matches!(
            std::process::Command::new("kill")
                .arg("-0")
                .arg(m3.pid().to_string())
                .status(),
            Ok(s) if s.success()
        ),
        "metal3 died:\n{}",
        m3.log_tail(40)
    );
    eprintln!("metal3 test body took {:?}", t_test.elapsed());
    hook.stop().await;
}
