//! The same CAPE contract as `tests/contract.rs` (shared bodies in
//! tests/common/contract_cases.rs) on the legacy CRDs: CAPE v0.3.6 (no device `nameservers`,
//! no `addressesFromPools`: DNS goes to `spec.network.nameservers`, deduplicated, at most 3)
//! and metal3 IPAM v1.1.3.

mod common;
#[path = "common/contract_cases.rs"]
mod contract_cases;

use common::controlplane::CrdSet::Legacy;
use contract_cases as case;

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            case::$name(Legacy).await
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

/// Legacy only: the served CRD changes under the running webhook.
#[tokio::test]
async fn dns_placement_follows_crd_changes() {
    case::dns_placement_follows_crd_changes(Legacy).await
}
