//! AdmissionReview decoding and the answer path, without an apiserver: the body is decoded as
//! the server does, the pure part of the decision runs ([`review::prepare`]), devices that
//! need an address get made-up leases instead of the assigner's, and the answer is encoded as
//! the server sends it.
//!
//! Properties: nothing panics; every body gets an answer; an answer to a readable request
//! carries its uid; a denial has a message and a code; a patch applies to the object and
//! leaves every device without a lease as it was.
#![no_main]

use std::net::Ipv4Addr;

use base64::Engine;
use cape_static_ip::assign::{Lease, needs_address};
use cape_static_ip::ipam::PoolKey;
use cape_static_ip::webhook::review::{self, Decision};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(data) {
        Ok(r) => r,
        Err(e) => {
            let answer = review::unreadable(data, &e);
            let response = encode(&answer, "AdmissionReview");
            assert!(!response.allowed);
            assert_eq!(response.result.code, 400);
            return;
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            let answer = review::unreadable(b"", &format!("not an admission request: {e}"));
            assert!(!encode(&answer, "AdmissionReview").allowed);
            return;
        }
    };
    let decision = match review::prepare(&request) {
        Err(decided) => decided,
        Ok(prepared) => {
            let devices = &prepared.spec.network.devices;
            assert!(devices.iter().any(needs_address));
            assert!(!prepared.name.is_empty());
            let leases: Vec<Lease> = devices
                .iter()
                .enumerate()
                .filter(|(_, d)| needs_address(d))
                .map(|(i, _)| lease(i, data.len()))
                .collect();
            let flag = data.len() % 2 == 0;
            let decision = prepared.patched(&leases, flag);
            let Decision::Patch(patch) = &decision else {
                panic!("leases give a patch, not {decision:?}");
            };
            let mut out = prepared.object_json.clone();
            json_patch::patch(&mut out, patch).expect("the patch applies to the object");
            let before = prepared.object_json["spec"]["network"]["devices"]
                .as_array()
                .expect("devices is a list when a device needs an address");
            let after = out["spec"]["network"]["devices"].as_array().unwrap();
            assert_eq!(before.len(), after.len());
            for (i, (b, a)) in before.iter().zip(after).enumerate() {
                if leases.iter().any(|l| l.device == i) {
                    let want = leases.iter().find(|l| l.device == i).unwrap();
                    assert_eq!(a["ipAddrs"], serde_json::json!([want.address.to_string()]));
                } else {
                    assert_eq!(a, b, "device {i} has no lease and must not change");
                }
            }
            if let Some(g) = &prepared.generated {
                assert_eq!(out["metadata"]["name"], Value::String(g.clone()));
            }
            decision
        }
    };
    let denied = matches!(decision, Decision::Deny { .. });
    if let Decision::Deny { code, message } = &decision {
        assert!(*code >= 400);
        assert!(!message.is_empty());
    }
    let answer = review::respond(&request, decision).into_review();
    // The answer echoes the request's apiVersion and kind (admission.k8s.io/v1 or v1beta1).
    let response = encode(&answer, &request.types.kind);
    assert_eq!(response.uid, request.uid);
    assert_eq!(response.allowed, !denied);
});

fn lease(device: usize, salt: usize) -> Lease {
    let n = (device as u32).wrapping_mul(2_654_435_761) ^ salt as u32;
    Lease {
        device,
        pool: PoolKey {
            namespace: "default".into(),
            name: "fuzz".into(),
        },
        claim: format!("fuzz-{device}"),
        address: Ipv4Addr::from(n),
        prefix: (n % 33) as u8,
        gateway: (n % 3 != 0).then(|| Ipv4Addr::from(n ^ 0xff)),
        dns_servers: (0..n % 5)
            .map(|k| Ipv4Addr::from(n.wrapping_add(k)))
            .collect(),
    }
}

/// Encodes the answer as the server does (JSON, patch in base64) and reads it back.
fn encode(answer: &AdmissionReview<DynamicObject>, kind: &str) -> AdmissionResponse {
    let mut value = serde_json::to_value(answer).expect("an answer encodes");
    let response = answer.response.clone().expect("an answer has a response");
    if let Some(patch) = &response.patch {
        let slot = value.pointer_mut("/response/patch").expect("patch field");
        *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
        let ops: json_patch::Patch =
            serde_json::from_slice(patch).expect("the patch is a JSON patch");
        assert!(!ops.0.is_empty());
    }
    let text = value.to_string();
    let back: Value = serde_json::from_str(&text).expect("the answer is JSON");
    assert_eq!(back["kind"], kind);
    response
}
