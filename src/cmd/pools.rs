//! `cape-static-ip pools`: a table of every IPPool with its size, used, free and cooling
//! addresses (released, kept for `--reuse-delay`; counted as used) and claims, computed the
//! way the webhook computes them.

use std::collections::HashMap;

use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use crate::cli::PoolsArgs;
use crate::cluster::crd::{IPAddress, IPClaim, IPPool};
use crate::cluster::index::pool_input;
use crate::contract::ANNOTATION_RELEASED_AT;
use crate::ipam::allocate::PoolState;
use crate::ipam::pool::parse_pool;

/// Prints the table.
pub async fn run(args: PoolsArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let (pools, addresses, claims) = match &args.namespace {
        Some(ns) => (
            Api::<IPPool>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await?,
            Api::<IPAddress>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await?,
            Api::<IPClaim>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await?,
        ),
        None => (
            Api::<IPPool>::all(client.clone())
                .list(&ListParams::default())
                .await?,
            Api::<IPAddress>::all(client.clone())
                .list(&ListParams::default())
                .await?,
            Api::<IPClaim>::all(client.clone())
                .list(&ListParams::default())
                .await?,
        ),
    };
    let mut used: HashMap<(String, String), Vec<std::net::Ipv4Addr>> = HashMap::new();
    let mut cooling: HashMap<(String, String), usize> = HashMap::new();
    for a in &addresses {
        let pool_ns = a.pool_namespace();
        if let (Some(pool), Ok(ip)) = (a.spec.pool.name.clone(), a.spec.address.parse()) {
            if a.annotations().contains_key(ANNOTATION_RELEASED_AT) {
                *cooling.entry((pool_ns.clone(), pool.clone())).or_default() += 1;
            }
            used.entry((pool_ns, pool)).or_default().push(ip);
        }
    }
    let mut claim_count: HashMap<(String, String), usize> = HashMap::new();
    for c in &claims {
        let ns = c.namespace().unwrap_or_default();
        if let Some(pool) = c.spec.pool.name.clone() {
            *claim_count.entry((ns, pool)).or_default() += 1;
        }
    }
    println!("{}", render(&pools.items, &used, &cooling, &claim_count));
    Ok(())
}

/// The table as text.
pub fn render(
    pools: &[IPPool],
    used: &HashMap<(String, String), Vec<std::net::Ipv4Addr>>,
    cooling: &HashMap<(String, String), usize>,
    claims: &HashMap<(String, String), usize>,
) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".into(),
        "SIZE".into(),
        "USED".into(),
        "FREE".into(),
        "COOLING".into(),
        "CLAIMS".into(),
        "PROBLEM".into(),
    ]];
    for pool in pools {
        let key = (pool.namespace().unwrap_or_default(), pool.name_any());
        let claims = claims.get(&key).copied().unwrap_or(0).to_string();
        let cooling = cooling.get(&key).copied().unwrap_or(0).to_string();
        match parse_pool(&pool_input(pool)) {
            Ok(parsed) => {
                let size = parsed.size();
                let state = PoolState::new(parsed, used.get(&key).cloned().unwrap_or_default());
                rows.push([
                    key.0,
                    key.1,
                    size.to_string(),
                    state.used().to_string(),
                    state.free().to_string(),
                    cooling,
                    claims,
                    String::new(),
                ]);
            }
            Err(e) => rows.push([
                key.0,
                key.1,
                "-".into(),
                "-".into(),
                "-".into(),
                cooling,
                claims,
                e.to_string(),
            ]),
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::crd::{IPPoolRange, IPPoolSpec};

    fn pool(name: &str, start: &str, end: &str) -> IPPool {
        let mut p = IPPool::new(
            name,
            IPPoolSpec {
                name_prefix: name.into(),
                pools: vec![IPPoolRange {
                    start: Some(start.into()),
                    end: Some(end.into()),
                    ..Default::default()
                }],
                prefix: Some(24),
                ..Default::default()
            },
        );
        p.metadata.namespace = Some("default".into());
        p
    }

    #[test]
    fn table_counts_used_free_claims_and_names_problems() {
        let pools = [
            pool("a", "10.0.0.10", "10.0.0.19"),
            pool("b", "10.0.0.30", "10.0.0.20"),
        ];
        let used = HashMap::from([(
            ("default".to_string(), "a".to_string()),
            vec!["10.0.0.10".parse().unwrap(), "10.0.0.11".parse().unwrap()],
        )]);
        let claims = HashMap::from([(("default".to_string(), "a".to_string()), 2)]);
        let cooling = HashMap::from([(("default".to_string(), "a".to_string()), 1)]);
        let table = render(&pools, &used, &cooling, &claims);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let a: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(a, ["default", "a", "10", "2", "8", "1", "2"]);
        assert!(
            lines[2].contains("start 10.0.0.30 is after end 10.0.0.20"),
            "{table}"
        );
    }
}
