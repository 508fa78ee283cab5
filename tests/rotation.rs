//! Serving-certificate rotation under a running webhook, through the real apiserver.
//!
//! The certificate and key are mounted the way the kubelet mounts a Secret volume: the
//! configured paths `DIR/tls.crt` and `DIR/tls.key` are symlinks to `..data/tls.crt` and
//! `..data/tls.key`, `..data` is a symlink to a timestamped payload directory, and an update
//! writes a new payload directory, points a temporary symlink at it and renames that over
//! `..data` (one atomic rename), then removes the old payload. The server re-reads the files
//! every `cert_reload` (200 ms in the tests).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cape_static_ip::webhook::certs::{self, DevCerts};
use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::{eventually, ip_of, setup, wait_for_pool};
use common::webhook::{self, TlsFiles, Webhook, WebhookOptions, capi_machine, create};
use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

fn hosts() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

/// A directory laid out like a kubelet Secret volume.
struct SecretVolume {
    dir: PathBuf,
    payload: Option<PathBuf>,
    generation: u32,
}

impl SecretVolume {
    /// A fresh volume in the temp dir holding `files` (name, content).
    fn new(tag: &str, files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "cape-static-ip-rotation-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut volume = SecretVolume {
            dir,
            payload: None,
            generation: 0,
        };
        volume.update(files);
        volume
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The kubelet's atomic update: a new timestamped payload directory, `..data_tmp` → it,
    /// rename `..data_tmp` over `..data`, user-visible symlinks created if missing, old
    /// payload removed.
    fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let now = time::OffsetDateTime::now_utc();
        let name = format!(
            "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}{}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.nanosecond(),
            self.generation
        );
        let payload = self.dir.join(&name);
        std::fs::create_dir(&payload).unwrap();
        for (file, content) in files {
            std::fs::write(payload.join(file), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for (file, _) in files {
            let link = self.dir.join(file);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(file), &link).unwrap();
            }
        }
        if let Some(old) = self.payload.replace(payload) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }

    /// Writes a certificate set as a `kubernetes.io/tls` Secret's keys.
    fn update_certs(&mut self, certs: &DevCerts) {
        self.update(&[
            ("ca.crt", &certs.ca_cert),
            ("tls.crt", &certs.cert),
            ("tls.key", &certs.key),
        ]);
    }
}

/// The DER of the first certificate in `pem`.
fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

fn expiry(pem: &str) -> i64 {
    certs::not_after(&der(pem)).unwrap()
}

/// Connects to `addr` with a rustls client that trusts only `ca_pem` (and checks the name
/// `addr`'s IP) and returns the leaf certificate the server presented (DER).
async fn served_leaf(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), ServerName::from(addr.ip())).unwrap();
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .unwrap_or_else(|e| panic!("TLS handshake with the webhook: {e}"));
        }
        conn.peer_certificates().expect("a server certificate")[0]
            .as_ref()
            .to_vec()
    })
    .await
    .unwrap()
}

fn gauge(hook: &Webhook) -> i64 {
    hook.running.state.metrics.certificate_expiry.get()
}

/// A namespace with a 250-address pool and a webhook serving `volume`'s files.
async fn start(
    client: &kube::Client,
    tag: &str,
    volume: &SecretVolume,
    ca_pem: &str,
) -> (String, Webhook) {
    let ns = temp_namespace(client, tag).await;
    let hook = webhook::start(
        client,
        &ns,
        WebhookOptions {
            tls: Some(TlsFiles {
                cert: volume.path("tls.crt"),
                key: volume.path("tls.key"),
                ca_pem: ca_pem.into(),
            }),
            ..Default::default()
        },
    )
    .await;
    setup(
        client,
        &ns,
        json!({
            "namePrefix": "pool",
            "pools": [{"start": "10.251.0.1", "end": "10.251.0.250"}],
            "prefix": 16, "gateway": "10.251.255.254"
        }),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    (ns, hook)
}

/// Creates ElfMachines `{prefix}-{i}` for `range` at `concurrency`; returns each one's
/// address or error.
async fn creates(
    client: &kube::Client,
    ns: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> Vec<Result<String, String>> {
    futures::stream::iter(range)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            async move {
                create(
                    client,
                    ns,
                    capi_machine(&name, "tpl", json!([{"networkType": "IPV4"}])),
                )
                .await
                .map(|m| ip_of(&serde_json::to_value(m).unwrap()))
                .map_err(|e| format!("{name}: {e}"))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

fn assert_all_addressed(results: &[Result<String, String>]) {
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} creates failed: {failed:#?}",
        failed.len()
    );
    let unaddressed = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|ip| ip.is_empty()))
        .count();
    assert_eq!(unaddressed, 0, "creates stored without an address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_symlink_swap_mid_stream_serves_the_new_leaf_without_a_failed_request() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let first = certs::generate(&hosts(), 30).unwrap();
    let mut volume = SecretVolume::new("swap", &[]);
    volume.update_certs(&first);
    let (ns, hook) = start(&client, "rotate", &volume, &first.ca_cert).await;
    assert_eq!(gauge(&hook), expiry(&first.cert));
    assert_eq!(
        served_leaf(hook.running.webhook_addr, &first.ca_cert).await,
        der(&first.cert)
    );

    // 150 creates at concurrency 5. The rotation happens once 50 are through; the last 50
    // wait until the server has picked up the new pair, so that requests are certainly
    // answered on both sides of the swap.
    const TOTAL: usize = 150;
    let done = Arc::new(AtomicUsize::new(0));
    let (rotated_tx, rotated_rx) = tokio::sync::watch::channel(false);
    let stream = {
        let (client, ns, done) = (client.clone(), ns.clone(), done.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..TOTAL)
                .map(|i| {
                    let (client, ns, done) = (client.clone(), ns.clone(), done.clone());
                    let mut rotated = rotated_rx.clone();
                    async move {
                        if i >= 100 {
                            rotated.wait_for(|r| *r).await.unwrap();
                        }
                        let name = format!("m-{i}");
                        let r = create(
                            &client,
                            &ns,
                            capi_machine(&name, "tpl", json!([{"networkType": "IPV4"}])),
                        )
                        .await
                        .map(|m| ip_of(&serde_json::to_value(m).unwrap()))
                        .map_err(|e| format!("{name}: {e}"));
                        done.fetch_add(1, Ordering::SeqCst);
                        r
                    }
                })
                .buffer_unordered(5)
                .collect::<Vec<_>>()
                .await
        })
    };

    eventually(Duration::from_secs(60), "50 creates through", || {
        let n = done.load(Ordering::SeqCst);
        async move { n >= 50 }
    })
    .await;
    // A new leaf from the same CA (the caBundle stays valid), with another expiry.
    let second = certs::generate_leaf(&first.ca_cert, &first.ca_key, &hosts(), 60).unwrap();
    assert_ne!(expiry(&second.cert), expiry(&first.cert));
    volume.update_certs(&second);
    let swapped_at = done.load(Ordering::SeqCst);
    let second_expiry = expiry(&second.cert);
    eventually(
        Duration::from_secs(10),
        "expiry gauge follows the new leaf",
        || {
            let g = gauge(&hook);
            async move { g == second_expiry }
        },
    )
    .await;
    let observed_at = done.load(Ordering::SeqCst);
    rotated_tx.send(true).unwrap();

    let results = stream.await.unwrap();
    assert_eq!(results.len(), TOTAL);
    assert_all_addressed(&results);
    let addresses: std::collections::BTreeSet<&String> =
        results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(addresses.len(), TOTAL, "duplicate addresses");
    assert!(
        swapped_at < TOTAL && observed_at < TOTAL,
        "the swap happened after the stream ({swapped_at}, {observed_at} of {TOTAL} done)"
    );
    eprintln!(
        "swap after {swapped_at} creates, new leaf served after {observed_at}, {TOTAL} created, 0 failed"
    );

    // The server presents the new leaf, and it chains to the CA the apiserver trusts.
    assert_eq!(
        served_leaf(hook.running.webhook_addr, &first.ca_cert).await,
        der(&second.cert)
    );
    // The apiserver still reaches the webhook on fresh creates.
    assert_all_addressed(&creates(&client, &ns, "after", 0..5, 5).await);
    hook.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_pair_keeps_the_old_certificate_then_a_good_pair_is_picked_up() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let first = certs::generate(&hosts(), 30).unwrap();
    let mut volume = SecretVolume::new("bad", &[]);
    volume.update_certs(&first);
    let (ns, hook) = start(&client, "rotate-bad", &volume, &first.ca_cert).await;
    let addr = hook.running.webhook_addr;
    assert_eq!(gauge(&hook), expiry(&first.cert));

    let next = certs::generate_leaf(&first.ca_cert, &first.ca_key, &hosts(), 45).unwrap();
    let other = certs::generate_leaf(&first.ca_cert, &first.ca_key, &hosts(), 50).unwrap();
    let garbage_key =
        "-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZSwgbm90IGEga2V5Cg==\n-----END PRIVATE KEY-----\n";
    let bad_pairs = [
        ("a garbage key", next.cert.as_str(), garbage_key),
        ("no key at all", next.cert.as_str(), ""),
        (
            "a key of another certificate",
            next.cert.as_str(),
            other.key.as_str(),
        ),
        (
            "a garbage certificate",
            "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
            next.key.as_str(),
        ),
    ];
    for (i, (what, cert, key)) in bad_pairs.into_iter().enumerate() {
        volume.update(&[
            ("ca.crt", &first.ca_cert),
            ("tls.crt", cert),
            ("tls.key", key),
        ]);
        // Requests keep passing through the apiserver for well over the reload period (each
        // reload attempt fails and is logged).
        let start = std::time::Instant::now();
        let results = creates(&client, &ns, &format!("bad{i}"), 0..10, 5).await;
        assert_all_addressed(&results);
        if let Some(rest) = Duration::from_secs(1).checked_sub(start.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        assert_eq!(
            gauge(&hook),
            expiry(&first.cert),
            "after {what}: the gauge must still show the old certificate"
        );
        assert_eq!(
            served_leaf(addr, &first.ca_cert).await,
            der(&first.cert),
            "after {what}: the old certificate must still be served"
        );
    }

    // A good pair is picked up on the next reload.
    volume.update_certs(&next);
    let next_expiry = expiry(&next.cert);
    eventually(
        Duration::from_secs(10),
        "expiry gauge follows the good pair",
        || {
            let g = gauge(&hook);
            async move { g == next_expiry }
        },
    )
    .await;
    assert_eq!(served_leaf(addr, &first.ca_cert).await, der(&next.cert));
    assert_all_addressed(&creates(&client, &ns, "good", 0..10, 5).await);
    hook.stop().await;
}
