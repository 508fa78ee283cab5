//! Only the apiserver can make the webhook write (issue 17), on the real control plane.
//!
//! The test control plane's kube-apiserver runs with an AdmissionConfiguration whose
//! `kubeConfigFile` gives every webhook a client certificate (CN kube-apiserver-kubelet-client,
//! signed by a CA of its own) and a bearer token (user cape-static-ip-apiserver), see
//! hack/controlplane/cluster.sh. Made-up reviews are `tests/fixtures/create.json` with new uids
//! and names, posted straight to the webhook as a pod that reaches its Service could.

mod common;

use std::time::Duration;

use cape_static_ip::assign::pending::Caps;
use cape_static_ip::webhook::auth::{AuthOptions, Mode};
use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::{count, eventually, ip_of};
use common::webhook::{
    self, Webhook, WebhookOptions, caller_identity, capi_machine, create, https_client, pool,
    template,
};
use kube::Client;
use serde_json::{Value, json};

/// The sample pool of `make run` (manifests/samples/ippool.yaml): 241 addresses.
const POOL: &str = "ip-pool-1";
const TEMPLATE: &str = "demo-worker";
const FLOOD: usize = 300;

/// Every webhook's background loop sweeps the claims of the whole cluster, and an address a
/// live machine carries is kept in every pool that contains it: the test with a short
/// `--claim-grace` runs alone (write); the floods that must stay in place, and the test whose
/// machines carry addresses of the same range, share (read).
static SWEEP: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The grace of every other webhook here: longer than any flood takes on a busy machine, so
/// that no sweep releases made-up claims while a test counts them.
const LONG_GRACE: Duration = Duration::from_secs(3600);

fn pool_spec(name: &str, third_octet: u8) -> Value {
    json!({
        "namePrefix": name,
        "pools": [{"start": format!("10.255.{third_octet}.10"), "end": format!("10.255.{third_octet}.250")}],
        "prefix": 16,
        "gateway": "10.255.0.1",
        "dnsServers": ["10.255.0.2"],
    })
}

/// A namespace with the sample pool and template, and a webhook registered for it.
async fn setup(prefix: &str, options: WebhookOptions) -> (Client, String, Webhook) {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, prefix).await;
    let hook = webhook::start(&client, &ns, options).await;
    add_pool(&client, &ns, &hook, POOL, 160).await;
    create(
        &client,
        &ns,
        template(TEMPLATE, json!({"cluster.x-k8s.io/ip-pool-name": POOL})),
    )
    .await
    .unwrap();
    (client, ns, hook)
}

async fn add_pool(client: &Client, ns: &str, hook: &Webhook, name: &str, third_octet: u8) {
    create(
        client,
        ns,
        pool(name, pool_spec(name, third_octet), json!({})),
    )
    .await
    .unwrap();
    let key = cape_static_ip::ipam::select::PoolKey::new(ns, name);
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

/// `tests/fixtures/create.json` for a machine that will never exist, in `ns`, naming `tpl`.
fn made_up(ns: &str, tag: &str, i: usize, tpl: &str) -> Value {
    let mut r: Value =
        serde_json::from_str(include_str!("fixtures/create.json")).expect("create.json");
    let name = format!("made-up-{tag}-{i:03}");
    r["request"]["uid"] = json!(format!("6a3e0000-0000-4000-8000-{i:012}"));
    r["request"]["name"] = json!(name);
    r["request"]["namespace"] = json!(ns);
    let meta = &mut r["request"]["object"]["metadata"];
    meta["name"] = json!(name);
    meta["namespace"] = json!(ns);
    meta["annotations"]["cluster.x-k8s.io/cloned-from-name"] = json!(tpl);
    r
}

/// Posts a review straight to the webhook; returns its `response`.
async fn post(http: &reqwest::Client, hook: &Webhook, body: &Value, token: Option<&str>) -> Value {
    let mut request = http
        .post(format!(
            "https://{}/mutate-elfmachine",
            hook.running.webhook_addr
        ))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer: Value = request
        .send()
        .await
        .expect("the webhook answers")
        .error_for_status()
        .expect("HTTP 200")
        .json()
        .await
        .expect("an AdmissionReview");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], body["request"]["uid"], "{answer}");
    response
}

/// Sends `n` made-up reviews over one connection, without credentials; returns how many were
/// allowed and the distinct denial messages (with their codes).
async fn flood(hook: &Webhook, ns: &str, tag: &str, n: usize, tpl: &str) -> (usize, Vec<String>) {
    let http = https_client(&hook.ca_pem, None);
    let mut allowed = 0;
    let mut denials = Vec::new();
    for i in 0..n {
        let r = post(&http, hook, &made_up(ns, tag, i, tpl), None).await;
        if r["allowed"] == true {
            allowed += 1;
        } else {
            // Without the "ElfMachine ns/name device 0: " each denial starts with.
            let message = r["status"]["message"].as_str().unwrap_or_default();
            let message = message.split_once(": ").map_or(message, |(_, m)| m);
            let d = format!("{} {message}", r["status"]["code"]);
            if !denials.contains(&d) {
                denials.push(d);
            }
        }
    }
    (allowed, denials)
}

async fn addresses(client: &Client, ns: &str) -> usize {
    count(client, ns, "IPAddress", "ipaddresses").await
}

/// Creates a machine through the apiserver: its address, or the denial.
async fn real_create(client: &Client, ns: &str, name: &str) -> Result<String, String> {
    match create(
        client,
        ns,
        capi_machine(
            name,
            TEMPLATE,
            json!([{"networkType": "IPV4", "vlan": "vlan-1"}]),
        ),
    )
    .await
    {
        Ok(m) => Ok(ip_of(&serde_json::to_value(m).unwrap())),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_writes_nothing_for_reviews_without_valid_credentials() {
    let _sweep = SWEEP.read().await;
    let (client, ns, hook) = setup(
        "auth-enforce",
        WebhookOptions {
            claim_grace: LONG_GRACE,
            ..Default::default()
        },
    )
    .await;
    let cp = shared(CrdSet::Current);

    // Through the apiserver, with the credentials its AdmissionConfiguration gives it.
    let real = real_create(&client, &ns, "real-0").await.expect("created");
    assert!(real.starts_with("10.255.160."), "{real}");
    let before = addresses(&client, &ns).await;
    let claims = count(&client, &ns, "IPClaim", "ipclaims").await;

    let review = made_up(&ns, "x", 0, TEMPLATE);
    let no_cert = https_client(&hook.ca_pem, None);
    let stranger = {
        let certs = cape_static_ip::webhook::certs::generate(&["stranger".into()], 1).unwrap();
        reqwest::Identity::from_pem(format!("{}{}", certs.cert, certs.key).as_bytes()).unwrap()
    };
    let other_ca = https_client(&hook.ca_pem, Some(stranger));
    let cases = [
        (
            "no credentials",
            &no_cert,
            None,
            401,
            "it carries no credentials",
        ),
        (
            "a certificate from another CA",
            &other_ca,
            None,
            401,
            "its client certificate is not accepted",
        ),
        (
            "a token the cluster does not know",
            &no_cert,
            Some("not-a-token"),
            401,
            "its bearer token is not valid",
        ),
        (
            "a valid token of a user that is not allowed",
            &no_cert,
            Some(cp.webhook_token()),
            403,
            "user \"webhook\"",
        ),
    ];
    for (what, http, token, code, detail) in cases {
        let r = post(http, &hook, &review, token).await;
        assert_eq!(r["allowed"], false, "{what}: {r}");
        assert_eq!(r["status"]["code"], code, "{what}: {r}");
        let message = r["status"]["message"].as_str().unwrap();
        assert!(message.contains(detail), "{what}: {message}");
        assert!(
            message.contains("accepts reviews only from the apiserver")
                && message.contains("Who may call the webhook"),
            "{what}: {message}"
        );
    }
    // 300 made-up reviews without credentials, over one connection.
    let (allowed, denials) = flood(&hook, &ns, "enforce", FLOOD, TEMPLATE).await;
    assert_eq!(allowed, 0, "{denials:?}");
    // Nothing was written but the real machine's claim and address.
    assert_eq!(addresses(&client, &ns).await, before);
    assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, claims);

    // With the apiserver's own credentials, straight to the webhook: served.
    let mut ok = made_up(&ns, "y", 1, TEMPLATE);
    ok["request"]["dryRun"] = json!(true);
    let with_cert = https_client(&hook.ca_pem, caller_identity());
    let r = post(&with_cert, &hook, &ok, None).await;
    assert_eq!(r["allowed"], true, "{r}");
    let r = post(&no_cert, &hook, &ok, Some(cp.caller_token())).await;
    assert_eq!(r["allowed"], true, "{r}");

    let metrics = hook.running.state.metrics.encode();
    for reason in [
        "no_credentials",
        "bad_certificate",
        "token_rejected",
        "identity_not_allowed",
    ] {
        assert!(
            metrics.contains(&format!(
                "cape_static_ip_unauthenticated_reviews_total{{mode=\"enforce\",reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    println!(
        "enforce: {FLOOD} made-up reviews without credentials: {allowed} allowed, {} addresses taken by them; real create: {real}",
        addresses(&client, &ns).await - before
    );
    hook.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_gets_in_with_either_credential_alone() {
    // Its machines carry addresses of the same range as the other tests' pools: a carried
    // address is kept in every pool that contains it, so the short-grace test must not run
    // beside it.
    let _sweep = SWEEP.read().await;
    let cp = shared(CrdSet::Current);
    let cert_only = AuthOptions {
        token_review: false,
        ..cp.caller_auth(Mode::Enforce)
    };
    let token_only = AuthOptions {
        client_ca_file: None,
        ..cp.caller_auth(Mode::Enforce)
    };
    for (what, auth) in [("certificate", cert_only), ("token", token_only)] {
        let (client, ns, hook) = setup(
            &format!("auth-{what}"),
            WebhookOptions {
                auth: Some(auth),
                claim_grace: LONG_GRACE,
                ..Default::default()
            },
        )
        .await;
        let real = real_create(&client, &ns, "real-0").await;
        assert!(
            real.as_deref()
                .is_ok_and(|ip| ip.starts_with("10.255.160.")),
            "{what}: {real:?}"
        );
        let before = addresses(&client, &ns).await;
        let r = post(
            &https_client(&hook.ca_pem, None),
            &hook,
            &made_up(&ns, what, 0, TEMPLATE),
            None,
        )
        .await;
        assert_eq!(r["status"]["code"], 401, "{what}: {r}");
        assert_eq!(addresses(&client, &ns).await, before, "{what}");
        hook.stop().await;
    }
}

/// The measurement of issue 17 in warn and off mode: 300 made-up reviews against the sample
/// pool (241 addresses) with the default caps, then a real create through the apiserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_takes_at_most_the_cap_in_warn_and_off_mode() {
    let _sweep = SWEEP.read().await;
    let cp = shared(CrdSet::Current);
    let cap = Caps::default().per_pool;
    for mode in [Mode::Warn, Mode::Off] {
        let tag = format!("{mode:?}").to_lowercase();
        let (client, ns, hook) = setup(
            &format!("auth-{tag}"),
            WebhookOptions {
                auth: Some(cp.caller_auth(mode)),
                claim_grace: LONG_GRACE,
                ..Default::default()
            },
        )
        .await;
        let (allowed, denials) = flood(&hook, &ns, &tag, FLOOD, TEMPLATE).await;
        let taken = addresses(&client, &ns).await;
        assert_eq!(allowed, cap, "{mode:?}: {denials:?}");
        assert_eq!(taken, cap, "{mode:?}");
        assert_eq!(denials.len(), 1, "{mode:?}: {denials:?}");
        let denial = &denials[0];
        assert!(
            denial.starts_with("429 ")
                && denial.contains(&format!("--max-pending-claims-per-pool={cap}"))
                && denial.contains(&format!("IPPool {ns}/{POOL}"))
                && denial.contains("refused before anything was written"),
            "{mode:?}: {denial}"
        );
        // Counted before the real create (which a client may retry on 429).
        let metrics = hook.running.state.metrics.encode();
        assert!(
            metrics.contains(&format!(
                "cape_static_ip_pending_claim_refusals_total{{pool=\"{ns}/{POOL}\",cap=\"max-pending-claims-per-pool\",caller=\"unverified\"}} {}",
                FLOOD - cap
            )),
            "{metrics}"
        );
        if mode == Mode::Warn {
            assert!(
                metrics.contains(&format!(
                    "cape_static_ip_unauthenticated_reviews_total{{mode=\"warn\",reason=\"no_credentials\"}} {FLOOD}"
                )),
                "{metrics}"
            );
        }
        let real = real_create(&client, &ns, "real-0").await;
        println!(
            "{tag}: {FLOOD} made-up reviews: {allowed} allowed, {taken} of 241 addresses taken; real create: {real:?}"
        );
        match mode {
            // The apiserver is authenticated: its creates draw from their own budget.
            Mode::Warn => {
                assert!(real.is_ok(), "{real:?}");
            }
            // Nobody is: the apiserver's create waits behind the cap like the flood's.
            _ => {
                let e = real.unwrap_err();
                assert!(
                    e.contains(&format!("--max-pending-claims-per-pool={cap}")),
                    "{e}"
                );
            }
        }
        hook.stop().await;
    }
}

/// The overall cap, the Event, and the sweep: claims whose machine never appears are
/// released at the grace, and then count no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overall_cap_bites_and_the_sweep_frees_the_budget() {
    let _sweep = SWEEP.write().await;
    let (client, ns, hook) = setup(
        "auth-caps",
        WebhookOptions {
            auth: Some(AuthOptions::off()),
            caps: Caps {
                per_pool: 20,
                total: 30,
            },
            claim_grace: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await;
    add_pool(&client, &ns, &hook, "second", 161).await;
    create(
        &client,
        &ns,
        template("second", json!({"cluster.x-k8s.io/ip-pool-name": "second"})),
    )
    .await
    .unwrap();

    let (allowed, denials) = flood(&hook, &ns, "a", 40, TEMPLATE).await;
    assert_eq!(allowed, 20, "{denials:?}");
    assert!(
        denials[0].contains("--max-pending-claims-per-pool=20"),
        "{denials:?}"
    );
    let (allowed, denials) = flood(&hook, &ns, "b", 40, "second").await;
    assert_eq!(allowed, 10, "{denials:?}");
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert!(
        denials[0].starts_with("429 ")
            && denials[0].contains("--max-pending-claims=30")
            && denials[0].contains("all pools"),
        "{denials:?}"
    );
    assert_eq!(addresses(&client, &ns).await, 30);

    // An Event on each pool says the cap was reached.
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(client.clone(), &ns);
    eventually(
        Duration::from_secs(20),
        "PendingClaimsCapped events",
        || {
            let events = events.clone();
            async move {
                let list = events.list(&Default::default()).await.unwrap();
                let capped: Vec<String> = list
                    .items
                    .iter()
                    .filter(|e| e.reason.as_deref() == Some("PendingClaimsCapped"))
                    .filter_map(|e| e.regarding.as_ref()?.name.clone())
                    .collect();
                capped.contains(&POOL.to_string()) && capped.contains(&"second".to_string())
            }
        },
    )
    .await;

    // The sweeper releases the made-up claims after the grace; the budget is free again.
    eventually(Duration::from_secs(60), "made-up claims released", || {
        let client = client.clone();
        let ns = ns.clone();
        let cached = hook.running.state.assigner.caches.claims.all();
        async move {
            addresses(&client, &ns).await == 0 && cached.iter().all(|c| *c.namespace != *ns)
        }
    })
    .await;
    let (allowed, _) = flood(&hook, &ns, "c", 25, TEMPLATE).await;
    assert_eq!(allowed, 20);
    hook.stop().await;
}
