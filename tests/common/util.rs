//! Small helpers shared by the lifecycle tests.

use std::time::{Duration, Instant};

use kube::Client;
use kube::api::ListParams;
use serde_json::{Value, json};

use super::webhook::{self, capi_machine, create, dynamic, machines, pool, template};

pub async fn count(client: &Client, ns: &str, kind: &str, plural: &str) -> usize {
    dynamic(client, ns, "ipam.metal3.io", "v1alpha1", kind, plural)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len()
}

pub async fn objects(client: &Client, ns: &str, kind: &str, plural: &str) -> Vec<Value> {
    dynamic(client, ns, "ipam.metal3.io", "v1alpha1", kind, plural)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| serde_json::to_value(o).unwrap())
        .collect()
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not true after {limit:?}");
}

pub async fn setup(client: &Client, ns: &str, pool_spec: Value) {
    create(client, ns, pool("pool", pool_spec, json!({})))
        .await
        .unwrap();
    create(
        client,
        ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "pool"})),
    )
    .await
    .unwrap();
}

pub async fn wait_for_pool(hook: &webhook::Webhook, ns: &str) {
    let key = cape_static_ip::ipam::select::PoolKey {
        namespace: ns.into(),
        name: "pool".into(),
    };
    eventually(Duration::from_secs(10), "pool cached", || {
        let ok = hook
            .running
            .state
            .assigner
            .caches
            .index
            .with_pool(&key, |_| ())
            .is_ok();
        async move { ok }
    })
    .await;
}

pub async fn create_machine(client: &Client, ns: &str, name: &str) -> Value {
    let m = create(
        client,
        ns,
        capi_machine(name, "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"));
    serde_json::to_value(m).unwrap()
}

pub fn ip_of(m: &Value) -> String {
    m["spec"]["network"]["devices"][0]["ipAddrs"][0]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub async fn gone(client: &Client, ns: &str, name: &str) -> bool {
    machines(client, ns).get_opt(name).await.unwrap().is_none()
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
