//! The whole CAPE contract (issue 4, DESIGN.md §2) on a real kube-apiserver with the current
//! CRDs: CAPE v1.8.1, metal3 IPAM v1.13.2, CAPI v1.14.0. The bodies are shared with
//! `tests/contract_legacy.rs` (tests/common/contract_cases.rs).

mod common;
// Some cases are for the legacy CRDs only.
#[allow(dead_code)]
#[path = "common/contract_cases.rs"]
mod contract_cases;

use common::controlplane::CrdSet::Current;
use contract_cases as case;

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            case::$name(Current).await
        }
    )*};
}

contract_tests!(
    rule1_device_pool_reference,
    rule2_pool_name_labels,
    rule3_group_and_network_labels,
    rule4_default_pools,
    rule4_default_namespace_and_no_pool,
    range_forms_and_overrides,
    never_gateway_network_or_broadcast,
    pre_allocations,
    allocation_strategy_is_pruned_by_these_crds,
    invalid_pools,
    several_devices,
    all_or_nothing,
    existing_addresses_untouched,
    generate_name,
    dry_run,
    update_hot_add_and_wiped,
    status_and_metadata_updates_cost_nothing,
    replayed_request_and_nothing_pruned,
    dns_placement,
    update_failure_keeps_existing_claims,
    half_written_pair_dry_run_then_adopted,
    concurrent_duplicate_requests,
    existing_claim_is_adopted,
    network_copied_in_later,
);
