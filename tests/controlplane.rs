//! Smoke test of the test control plane (tests/common/controlplane.rs).
mod common;

use common::controlplane::{CrdSet, shared, temp_namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};

const CRDS: [&str; 5] = [
    "elfmachines.infrastructure.cluster.x-k8s.io",
    "elfmachinetemplates.infrastructure.cluster.x-k8s.io",
    "ippools.ipam.metal3.io",
    "ipclaims.ipam.metal3.io",
    "ipaddresses.ipam.metal3.io",
];

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

#[tokio::test]
async fn control_plane_serves_v1_34_with_crds_established() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;

    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(version.git_version, "v1.34.4");

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let list = crds
        .list(
            &ListParams::default()
                .fields("metadata.name=elfmachines.infrastructure.cluster.x-k8s.io"),
        )
        .await
        .expect("list CRDs");
    assert_eq!(list.items.len(), 1, "ElfMachine CRD listed");
    for name in CRDS {
        let crd = crds
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get CRD {name}: {e}"));
        assert!(
            established(&crd),
            "CRD {name} is not Established: {:?}",
            crd.status
        );
    }

    // The namespace helper works, and the webhook user holds exactly the shipped ClusterRole:
    // it reads the ElfMachine CRD (to learn its schema: by name, as the code watches it) but
    // no other CRD, and cannot list namespaces.
    let ns = temp_namespace(&client, "smoke").await;
    assert!(ns.starts_with("smoke-") && ns.len() == "smoke-".len() + 6);
    let as_webhook = cp.client_as_webhook_user().await;
    let crds = Api::<CustomResourceDefinition>::all(as_webhook.clone());
    crds.list(
        &ListParams::default().fields("metadata.name=elfmachines.infrastructure.cluster.x-k8s.io"),
    )
    .await
    .map(|_| ())
    .unwrap_or_else(|e| panic!("the webhook user may list the ElfMachine CRD: {e}"));
    crds.list(&ListParams::default().limit(1))
        .await
        .map(|_| ())
        .expect_err("the webhook user has no right to other CRDs");
    let denied = Api::<k8s_openapi::api::core::v1::Namespace>::all(as_webhook)
        .list(&ListParams::default())
        .await
        .map(|_| ())
        .expect_err("the webhook user has no right to namespaces");
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "expected 403 Forbidden, got {denied:?}"
    );
}
