//! Builds the JSON patch that writes leased addresses into an ElfMachine: per device
//! `ipAddrs`, `netmask`, a gateway route and DNS servers, plus our finalizer and, for
//! `generateName` requests, the name. Pure: it reads the object as JSON and returns explicit
//! operations, so fields this project does not model are never touched.

use std::net::Ipv4Addr;

use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::{Value, json};

use crate::assign::Lease;
use crate::contract::STATIC_IP_FINALIZER;
use crate::ipam::pool::netmask;

/// CAPE sends at most this many nameservers to the VM.
pub const MAX_NAMESERVERS: usize = 3;

/// What to change besides the leased devices.
#[derive(Debug, Default, Clone)]
pub struct Extras<'a> {
    /// Set `metadata.name` (a `generateName` request).
    pub name: Option<&'a str>,
    /// Add our finalizer when missing.
    pub finalizer: bool,
    /// DNS servers go to each device's `nameservers` (CAPE ≥ 1.7.2) instead of
    /// `spec.network.nameservers`.
    pub device_nameservers: bool,
}

fn add(path: String, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: path
            .parse()
            .expect("patch paths built here are valid JSON pointers"),
        value,
    })
}

/// The operations that apply `leases` (and `extras`) to `object`, an ElfMachine as JSON.
pub fn build(object: &Value, leases: &[Lease], extras: &Extras<'_>) -> Patch {
    let mut ops = Vec::new();
    if let Some(name) = extras.name {
        ops.push(add("/metadata/name".into(), json!(name)));
    }
    if extras.finalizer {
        match object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
        {
            None => ops.push(add(
                "/metadata/finalizers".into(),
                json!([STATIC_IP_FINALIZER]),
            )),
            Some(list) if !list.iter().any(|f| f == STATIC_IP_FINALIZER) => ops.push(add(
                "/metadata/finalizers/-".into(),
                json!(STATIC_IP_FINALIZER),
            )),
            Some(_) => {}
        }
    }
    let mut network_dns: Vec<String> = object
        .pointer("/spec/network/nameservers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let dns_before = network_dns.clone();
    for lease in leases {
        let base = format!("/spec/network/devices/{}", lease.device);
        let device = object.pointer(&base).cloned().unwrap_or(Value::Null);
        ops.push(add(
            format!("{base}/ipAddrs"),
            json!([lease.address.to_string()]),
        ));
        ops.push(add(
            format!("{base}/netmask"),
            json!(netmask(lease.prefix).to_string()),
        ));
        if let Some(gateway) = lease.gateway {
            let routes = with_gateway(device.get("routes"), gateway);
            ops.push(add(format!("{base}/routes"), routes));
        }
        if !lease.dns_servers.is_empty() {
            let dns: Vec<String> = lease.dns_servers.iter().map(Ipv4Addr::to_string).collect();
            if extras.device_nameservers {
                let mut list = dns;
                list.truncate(MAX_NAMESERVERS);
                ops.push(add(format!("{base}/nameservers"), json!(list)));
            } else {
                for d in dns {
                    if !network_dns.contains(&d) && network_dns.len() < MAX_NAMESERVERS {
                        network_dns.push(d);
                    }
                }
            }
        }
    }
    if network_dns != dns_before {
        ops.push(add("/spec/network/nameservers".into(), json!(network_dns)));
    }
    Patch(ops)
}

/// A device's routes with a default route through `gateway`: existing routes are kept; a
/// route to that gateway is added unless one is there already.
fn with_gateway(existing: Option<&Value>, gateway: Ipv4Addr) -> Value {
    let mut routes: Vec<Value> = existing
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let gw = gateway.to_string();
    let present = routes.iter().any(|r| {
        r.get("gateway").and_then(Value::as_str) == Some(gw.as_str())
            && r.get("network")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .is_empty()
    });
    if !present {
        routes.push(json!({"gateway": gw}));
    }
    Value::Array(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::select::PoolKey;

    fn lease(device: usize, ip: [u8; 4], gateway: Option<[u8; 4]>, dns: &[[u8; 4]]) -> Lease {
        Lease {
            device,
            pool: PoolKey {
                namespace: "default".into(),
                name: "ip-pool-1".into(),
            },
            claim: format!("default-m-{device}"),
            address: ip.into(),
            prefix: 16,
            gateway: gateway.map(Into::into),
            dns_servers: dns.iter().map(|d| (*d).into()).collect(),
        }
    }

    fn apply(object: &Value, patch: &Patch) -> Value {
        let mut out = object.clone();
        json_patch::patch(&mut out, patch).expect("patch applies");
        out
    }

    fn machine() -> Value {
        json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
            "kind": "ElfMachine",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {"template": "t", "network": {"nameservers": [], "devices": [
                {"networkType": "IPV4", "vlan": "v1"},
                {"networkType": "IPV4_DHCP", "vlan": "v2"}
            ]}}
        })
    }

    #[test]
    fn fills_device_and_finalizer_and_leaves_others() {
        let object = machine();
        let leases = [lease(
            0,
            [10, 255, 160, 10],
            Some([10, 255, 0, 1]),
            &[[10, 255, 0, 2]],
        )];
        let extras = Extras {
            finalizer: true,
            device_nameservers: true,
            ..Default::default()
        };
        let out = apply(&object, &build(&object, &leases, &extras));
        assert_eq!(
            out,
            json!({
                "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
                "kind": "ElfMachine",
                "metadata": {"name": "m", "namespace": "default",
                             "finalizers": ["elfmachinestaticip.infrastructure.cluster.x-k8s.io"]},
                "spec": {"template": "t", "network": {"nameservers": [], "devices": [
                    {"networkType": "IPV4", "vlan": "v1", "ipAddrs": ["10.255.160.10"],
                     "netmask": "255.255.0.0", "routes": [{"gateway": "10.255.0.1"}],
                     "nameservers": ["10.255.0.2"]},
                    {"networkType": "IPV4_DHCP", "vlan": "v2"}
                ]}}
            })
        );
    }

    #[test]
    fn network_level_dns_is_merged_deduplicated_and_capped() {
        let mut object = machine();
        object["spec"]["network"]["nameservers"] = json!(["114.114.114.114", "10.0.0.2"]);
        object["spec"]["network"]["devices"][1]["networkType"] = json!("IPV4");
        let leases = [
            lease(0, [10, 0, 0, 10], None, &[[10, 0, 0, 2], [10, 0, 0, 3]]),
            lease(1, [10, 0, 0, 11], None, &[[10, 0, 0, 4]]),
        ];
        let out = apply(&object, &build(&object, &leases, &Extras::default()));
        assert_eq!(
            out["spec"]["network"]["nameservers"],
            json!(["114.114.114.114", "10.0.0.2", "10.0.0.3"])
        );
        assert!(out["spec"]["network"]["devices"][0].get("routes").is_none());
        assert!(
            out["spec"]["network"]["devices"][0]
                .get("nameservers")
                .is_none()
        );
        assert_eq!(
            out["spec"]["network"]["devices"][1]["ipAddrs"],
            json!(["10.0.0.11"])
        );
    }

    #[test]
    fn keeps_other_routes_and_existing_finalizers_and_sets_generated_name() {
        let mut object = machine();
        object["metadata"]["finalizers"] = json!(["other"]);
        object["spec"]["network"]["devices"][0]["routes"] =
            json!([{"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.0.0.9"}]);
        let leases = [lease(0, [10, 0, 0, 10], Some([10, 0, 0, 1]), &[])];
        let extras = Extras {
            name: Some("m-abcde"),
            finalizer: true,
            device_nameservers: true,
        };
        let out = apply(&object, &build(&object, &leases, &extras));
        assert_eq!(out["metadata"]["name"], "m-abcde");
        assert_eq!(
            out["metadata"]["finalizers"],
            json!(["other", STATIC_IP_FINALIZER])
        );
        assert_eq!(
            out["spec"]["network"]["devices"][0]["routes"],
            json!([{"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.0.0.9"},
                   {"gateway": "10.0.0.1"}])
        );
        // Applying the same leases again changes nothing more.
        let again = apply(&out, &build(&out, &leases, &extras));
        assert_eq!(
            again["spec"]["network"]["devices"][0]["routes"],
            out["spec"]["network"]["devices"][0]["routes"]
        );
        assert_eq!(
            again["metadata"]["finalizers"],
            out["metadata"]["finalizers"]
        );
    }

    /// The objects of AdmissionReviews as kube-apiserver sent them (tests/fixtures).
    fn fixture(name: &str) -> Value {
        let text = match name {
            "create" => include_str!("../../tests/fixtures/create.json"),
            "two-devices" => include_str!("../../tests/fixtures/two-devices.json"),
            "dhcp-and-ipv4" => include_str!("../../tests/fixtures/dhcp-and-ipv4.json"),
            "update-wiped" => include_str!("../../tests/fixtures/update-wiped.json"),
            _ => unreachable!(),
        };
        let review: Value = serde_json::from_str(text).expect("fixture is JSON");
        review["request"]["object"].clone()
    }

    #[test]
    fn applies_to_captured_requests() {
        let extras = Extras {
            finalizer: true,
            device_nameservers: true,
            ..Default::default()
        };
        // CREATE: the finalizer list is created, only the device changes.
        let object = fixture("create");
        let leases = [lease(
            0,
            [10, 30, 0, 10],
            Some([10, 30, 0, 1]),
            &[[10, 30, 0, 2]],
        )];
        let out = apply(&object, &build(&object, &leases, &extras));
        assert_eq!(out["metadata"]["finalizers"], json!([STATIC_IP_FINALIZER]));
        let dev = &out["spec"]["network"]["devices"][0];
        assert_eq!(dev["ipAddrs"], json!(["10.30.0.10"]));
        assert_eq!(dev["netmask"], "255.255.0.0");
        assert_eq!(dev["routes"], json!([{"gateway": "10.30.0.1"}]));
        assert_eq!(dev["nameservers"], json!(["10.30.0.2"]));
        let mut rest = out.clone();
        rest["spec"]["network"]["devices"] = object["spec"]["network"]["devices"].clone();
        rest["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("finalizers");
        assert_eq!(rest, object, "nothing else changes");

        // DHCP + IPV4: the DHCP device is untouched.
        let object = fixture("dhcp-and-ipv4");
        let leases = [lease(1, [10, 30, 0, 11], None, &[])];
        let out = apply(&object, &build(&object, &leases, &extras));
        assert_eq!(
            out["spec"]["network"]["devices"][0],
            object["spec"]["network"]["devices"][0]
        );
        assert_eq!(
            out["spec"]["network"]["devices"][1]["ipAddrs"],
            json!(["10.30.0.11"])
        );

        // Two devices, legacy DNS placement: merged into spec.network.nameservers.
        let object = fixture("two-devices");
        let leases = [
            lease(0, [10, 30, 0, 12], None, &[[10, 30, 0, 2]]),
            lease(1, [10, 30, 0, 13], None, &[[10, 30, 0, 2], [10, 30, 0, 3]]),
        ];
        let legacy = Extras {
            device_nameservers: false,
            ..extras.clone()
        };
        let out = apply(&object, &build(&object, &leases, &legacy));
        assert_eq!(
            out["spec"]["network"]["nameservers"],
            json!(["10.30.0.2", "10.30.0.3"])
        );
        assert_eq!(
            out["spec"]["network"]["devices"][1]["ipAddrs"],
            json!(["10.30.0.13"])
        );

        // UPDATE with wiped ipAddrs: the finalizer is already there, not added twice.
        let object = fixture("update-wiped");
        assert_eq!(
            object["metadata"]["finalizers"],
            json!([STATIC_IP_FINALIZER])
        );
        let leases = [lease(0, [10, 30, 0, 10], Some([10, 30, 0, 1]), &[])];
        let patch = build(&object, &leases, &extras);
        let out = apply(&object, &patch);
        assert_eq!(out["metadata"]["finalizers"], json!([STATIC_IP_FINALIZER]));
        assert_eq!(
            out["spec"]["network"]["devices"][0]["ipAddrs"],
            json!(["10.30.0.10"])
        );
    }
}
