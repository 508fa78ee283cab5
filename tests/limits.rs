//! The server sheds what it cannot serve: slow clients are closed by their deadline while good
//! reviews are still answered, connections and reviews beyond their caps get a fast error, and
//! HTTP/2 is offered only when enabled.
//!
//! Figures are printed (`cargo test --test limits -- --nocapture`): connections held, the
//! latency of good reviews while they are held, and how long each kind of slow connection
//! lasted. Nothing is asserted about speed, only about outcomes, with generous bounds.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cape_static_ip::cmd::serve::{self, Options, Running};
use cape_static_ip::webhook::listener::{CLOSE_GRACE, Limits};
use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::{create_machine, ip_of, setup, wait_for_pool};
use common::webhook::{self, WebhookOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/create.json");

/// A TLS client that trusts `ca_pem` and offers `alpn`.
fn tls_client(ca_pem: &str, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn https(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_client(ca_pem, &[b"h2", b"http/1.1"]))
        .build()
        .unwrap()
}

/// Raises the soft limit on open files to the hard one; fails clearly when it is below `need`.
fn raise_fd_limit(need: u64) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    assert!(
        limit >= need,
        "this test holds {need} descriptors at once but the open-file limit is {limit}: raise it (ulimit -n)"
    );
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// TCP connected, no ClientHello.
    NoHello,
    /// TLS handshake done, then nothing.
    Silent,
    /// Half a request head, then one byte a second.
    HalfHead,
    /// A whole head announcing 100 kB of body, then one byte a second.
    SlowBody,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::NoHello, Kind::Silent, Kind::HalfHead, Kind::SlowBody];

    /// What the client sends at once (after the handshake), and whether it then trickles.
    fn opening(self) -> (&'static [u8], bool) {
        match self {
            Kind::NoHello | Kind::Silent => (b"", false),
            Kind::HalfHead => (
                b"POST /mutate-elfmachine HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ",
                true,
            ),
            Kind::SlowBody => (
                b"POST /mutate-elfmachine HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
                true,
            ),
        }
    }
}

/// How one slow connection ended.
struct Ended {
    kind: Kind,
    /// From the moment its deadline started (connected, handshake done, head sent) to the
    /// moment the server closed it.
    lasted: Duration,
    /// What the server sent before closing.
    received: Vec<u8>,
}

/// Opens one slow connection of `kind`, calls `opened` once it is in its slow phase, and
/// returns when the server has closed it.
async fn slow_client(
    kind: Kind,
    addr: SocketAddr,
    tls: TlsConnector,
    opened: impl FnOnce(),
) -> Ended {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    if kind == Kind::NoHello {
        let start = Instant::now();
        opened();
        return hold(kind, tcp, start, false).await;
    }
    let mut stream = tls
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .expect("TLS handshake");
    let (opening, trickle) = kind.opening();
    stream.write_all(opening).await.unwrap();
    let start = Instant::now();
    opened();
    hold(kind, stream, start, trickle).await
}

/// Reads until the server closes; meanwhile sends one byte a second when `trickle`.
async fn hold<S: AsyncRead + AsyncWrite + Unpin>(
    kind: Kind,
    mut stream: S,
    start: Instant,
    trickle: bool,
) -> Ended {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick(), if trickle => {
                if stream.write_all(b" ").await.is_err() || stream.flush().await.is_err() {
                    // Closed while we wrote; the read sees it next.
                }
            }
        }
    }
    Ended {
        kind,
        lasted: start.elapsed(),
        received,
    }
}

/// 5,000 slow connections of four kinds are held open at once while ElfMachines are still
/// created through the apiserver, and the server closes every one of them by its deadline.
#[tokio::test]
async fn five_thousand_slow_connections_are_closed_by_their_deadline_while_reviews_go_on() {
    const SLOW: usize = 5000;
    // Long enough that all of them are open at once on a busy machine; the defaults are 5 s.
    const DEADLINE: Duration = Duration::from_secs(30);
    // The test's own bound for "closed by the deadline": scheduling on a loaded machine.
    const SLACK: Duration = Duration::from_secs(15);
    raise_fd_limit(2 * SLOW as u64 + 500);

    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "limits").await;
    let limits = Limits {
        tls_handshake_timeout: DEADLINE,
        request_header_timeout: DEADLINE,
        request_body_timeout: DEADLINE,
        max_connections: SLOW + 200,
        ..Limits::default()
    };
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            background: false,
            limits: limits.clone(),
            ..Default::default()
        },
    )
    .await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "pools": [{"start": "10.9.0.1", "end": "10.9.0.250"}], "prefix": 24}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;

    let mut usual = Vec::new();
    for i in 0..5 {
        let start = Instant::now();
        let m = create_machine(&client, &ns, &format!("before-{i}")).await;
        usual.push(start.elapsed());
        assert!(!ip_of(&m).is_empty(), "{m:#}");
    }

    let rss_before = rss_mib();
    let addr = hook.running.webhook_addr;
    let tls = TlsConnector::from(Arc::new(tls_client(&hook.ca_pem, &[b"http/1.1"])));
    let opening = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for i in 0..SLOW {
        let kind = Kind::ALL[i % Kind::ALL.len()];
        let (gate, tls, opened) = (gate.clone(), tls.clone(), opened.clone());
        held.push(tokio::spawn(async move {
            let turn = gate.acquire_owned().await.unwrap();
            slow_client(kind, addr, tls, move || {
                drop(turn);
                opened.fetch_add(1, Ordering::Relaxed);
            })
            .await
        }));
    }
    // (A client that ended or failed early stops the wait: the checks below report it.)
    while opened.load(Ordering::Relaxed) < SLOW && !held.iter().any(|h| h.is_finished()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let opened_in = opening.elapsed();
    let still_open = held.iter().filter(|h| !h.is_finished()).count();
    let rss_held = rss_mib();
    println!(
        "opened {SLOW} slow connections in {opened_in:.1?}; open at once: {still_open}; \
         RSS of this process (client and server) {rss_before:.0} -> {rss_held:.0} MiB"
    );

    // Good reviews while they are held: ElfMachines created through the apiserver.
    let mut during = Vec::new();
    for i in 0..5 {
        let start = Instant::now();
        let m = create_machine(&client, &ns, &format!("during-{i}")).await;
        during.push(start.elapsed());
        assert!(!ip_of(&m).is_empty(), "{m:#}");
    }
    let still_open_after = held.iter().filter(|h| !h.is_finished()).count();
    println!(
        "create latency through the apiserver: usual {usual:.0?}; with the slow connections held {during:.0?} \
         (slow connections still open after them: {still_open_after})"
    );

    // Every slow connection is closed by the server, within its deadline and our slack.
    let bound = DEADLINE + CLOSE_GRACE + SLACK;
    let mut ended = Vec::new();
    for h in held {
        let end = tokio::time::timeout(bound + opened_in, h)
            .await
            .expect("a slow connection was never closed by the server")
            .unwrap();
        ended.push(end);
    }
    println!(
        "all {SLOW} slow connections closed {:.1?} after the last one opened",
        opening.elapsed() - opened_in
    );
    let mut by_kind: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
    for e in &ended {
        assert!(
            e.lasted + Duration::from_secs(1) >= DEADLINE,
            "{:?} closed after {:?}, before its deadline {DEADLINE:?}",
            e.kind,
            e.lasted
        );
        assert!(
            e.lasted <= bound,
            "{:?} closed only after {:?} (deadline {DEADLINE:?})",
            e.kind,
            e.lasted
        );
        if e.kind == Kind::SlowBody {
            let text = String::from_utf8_lossy(&e.received);
            assert!(
                text.starts_with("HTTP/1.1 408") && text.contains("--request-body-timeout"),
                "a slow body gets a clear 408: {text}"
            );
        } else {
            assert!(
                e.received.is_empty(),
                "{:?}: nothing sent: {:?}",
                e.kind,
                e.received
            );
        }
        by_kind.entry(e.kind).or_default().push(e.lasted);
    }
    for (kind, mut lasted) in by_kind {
        lasted.sort();
        println!(
            "{kind:?}: {} connections, closed after {:.2?} .. {:.2?} (deadline {DEADLINE:?})",
            lasted.len(),
            lasted[0],
            lasted[lasted.len() - 1]
        );
    }

    // And the server still answers afterwards.
    let m = create_machine(&client, &ns, "after").await;
    assert!(!ip_of(&m).is_empty(), "{m:#}");
    hook.stop().await;
}

/// A webhook whose apiserver is unreachable: its caches never sync, so each review stays in
/// flight for the start-up wait (5 s) before it is denied as "starting".
async fn unsynced_webhook(limits: Limits) -> (Running, String, std::path::PathBuf) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", unreachable.local_addr().unwrap());
    drop(unreachable);
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (dir, ca_pem) = webhook::dev_certs("limits");
    let running = serve::start(
        client,
        Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert_file: dir.join("tls.crt"),
            tls_key_file: dir.join("tls.key"),
            default_pool_namespace: "cape-system".into(),
            resync: Duration::from_secs(300),
            claim_grace: Duration::from_secs(120),
            reuse_delay: Duration::ZERO,
            cert_reload: Duration::from_secs(60),
            drain: Duration::from_secs(1),
            shutdown_delay: Duration::ZERO,
            background: false,
            limits,
            // Reviews are posted straight to it.
            auth: cape_static_ip::webhook::auth::AuthOptions::off(),
            caps: Default::default(),
        },
    )
    .await
    .expect("webhook starts");
    (running, ca_pem, dir)
}

#[tokio::test]
async fn reviews_beyond_the_in_flight_cap_are_denied_at_once_with_a_clear_message() {
    let (running, ca_pem, dir) = unsynced_webhook(Limits {
        max_reviews_in_flight: 2,
        ..Limits::default()
    })
    .await;
    let url = format!("https://{}/mutate-elfmachine", running.webhook_addr);
    let fixture = std::fs::read(FIXTURE).unwrap();
    let http = https(&ca_pem);
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(http.post(&url).body(fixture.clone()).send()))
        .collect();
    let start = Instant::now();
    while running.state.reviews.in_flight() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "reviews never in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let start = Instant::now();
    let answer = http.post(&url).body(fixture.clone()).send().await.unwrap();
    let took = start.elapsed();
    assert_eq!(answer.status(), 200);
    let review: Value = answer.json().await.unwrap();
    let response = &review["response"];
    assert_eq!(response["allowed"], false, "{review}");
    assert_eq!(response["status"]["code"], 429, "{review}");
    assert_eq!(response["uid"], "b81096d7-7c72-4915-ac19-e36fe175b00c");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("busy") && message.contains("--max-reviews-in-flight"),
        "{message}"
    );
    println!("beyond the cap: denied in {took:.1?}: {message}");

    // The two in flight are answered (as "starting"), and the cap frees up.
    for s in slow {
        let answer: Value = s.await.unwrap().unwrap().json().await.unwrap();
        assert_eq!(answer["response"]["status"]["code"], 503, "{answer}");
    }
    assert_eq!(running.state.reviews.in_flight(), 0);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_idle_ones_make_room() {
    const CAP: usize = 10;
    let (running, ca_pem, dir) = unsynced_webhook(Limits {
        max_connections: CAP,
        tls_handshake_timeout: Duration::from_secs(600),
        ..Limits::default()
    })
    .await;
    let addr = running.webhook_addr;
    let tls = TlsConnector::from(Arc::new(tls_client(&ca_pem, &[b"http/1.1"])));
    // CAP - 1 clients that never say hello, and one idle keep-alive connection after a request.
    let mut held = Vec::new();
    for _ in 0..CAP - 1 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut idle = tls.connect(ServerName::from(addr.ip()), tcp).await.unwrap();
    one_request(&mut idle).await;

    // One more: closed at once, and the idle connection is closed to make room.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(30), extra.read(&mut [0u8; 16]))
        .await
        .expect("the connection beyond the cap is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    println!("beyond the cap: closed in {:.1?}", start.elapsed());
    let read = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut [0u8; 16]))
        .await
        .expect("the idle connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    for h in &held {
        let mut buf = [0u8; 1];
        assert!(
            matches!(h.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the connections within the cap that are not idle stay open"
        );
    }

    // A new client is served in the room made.
    let start = Instant::now();
    loop {
        let tcp = TcpStream::connect(addr).await.unwrap();
        if tls.connect(ServerName::from(addr.ip()), tcp).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no room after the idle connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends a request on `stream` and reads its whole (empty-bodied) answer.
async fn one_request<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    stream
        .write_all(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn an_idle_connection_lasts_the_idle_timeout_and_a_later_head_its_own_deadline() {
    const HEAD: Duration = Duration::from_secs(2);
    const IDLE: Duration = Duration::from_secs(6);
    const SLACK: Duration = Duration::from_secs(10);
    let (running, ca_pem, dir) = unsynced_webhook(Limits {
        request_header_timeout: HEAD,
        idle_timeout: IDLE,
        ..Limits::default()
    })
    .await;
    let addr = running.webhook_addr;
    let tls = TlsConnector::from(Arc::new(tls_client(&ca_pem, &[b"http/1.1"])));
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tls.connect(ServerName::from(addr.ip()), tcp).await.unwrap()
    };

    // Idle after a request: held for the idle timeout, longer than the head deadline.
    let mut idle = connect().await;
    one_request(&mut idle).await;
    let idle = tokio::spawn(hold(Kind::Silent, idle, Instant::now(), false));

    // A second request that starts after a pause and trickles: cut by the head deadline,
    // counted from its first byte.
    let mut late = connect().await;
    one_request(&mut late).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    late.write_all(b"POST /mutate-elfmachine HTTP/1.1\r\nX-Pad: ")
        .await
        .unwrap();
    let late = tokio::spawn(hold(Kind::HalfHead, late, Instant::now(), true));

    let late = late.await.unwrap();
    let idle = idle.await.unwrap();
    println!(
        "idle connection closed after {:.2?} (idle timeout {IDLE:?}); later head cut after {:.2?} (deadline {HEAD:?})",
        idle.lasted, late.lasted
    );
    assert!(
        idle.lasted + Duration::from_millis(500) >= IDLE,
        "{:?}",
        idle.lasted
    );
    assert!(
        idle.lasted <= IDLE + CLOSE_GRACE + SLACK,
        "{:?}",
        idle.lasted
    );
    assert!(
        late.lasted + Duration::from_millis(500) >= HEAD,
        "{:?}",
        late.lasted
    );
    assert!(late.lasted <= HEAD + SLACK, "{:?}", late.lasted);
    assert!(late.received.is_empty() && idle.received.is_empty());
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The protocol the server picks for a client that offers h2 and HTTP/1.1.
async fn negotiated(addr: SocketAddr, ca_pem: &str) -> Option<Vec<u8>> {
    let tls = TlsConnector::from(Arc::new(tls_client(ca_pem, &[b"h2", b"http/1.1"])));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tls.connect(ServerName::from(addr.ip()), tcp).await.unwrap();
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

#[tokio::test]
async fn http2_is_offered_only_when_enabled() {
    let (running, ca_pem, dir) = unsynced_webhook(Limits::default()).await;
    assert_eq!(
        negotiated(running.webhook_addr, &ca_pem).await.as_deref(),
        Some(&b"http/1.1"[..])
    );
    let answer = https(&ca_pem)
        .post(format!(
            "https://{}/mutate-elfmachine",
            running.webhook_addr
        ))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_11);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);

    let (running, ca_pem, dir) = unsynced_webhook(Limits {
        http2: true,
        ..Limits::default()
    })
    .await;
    assert_eq!(
        negotiated(running.webhook_addr, &ca_pem).await.as_deref(),
        Some(&b"h2"[..])
    );
    let answer = https(&ca_pem)
        .post(format!(
            "https://{}/mutate-elfmachine",
            running.webhook_addr
        ))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    assert_eq!(answer.status(), 200);
    let review: Value = answer.json().await.unwrap();
    assert_eq!(review["response"]["allowed"], false, "{review}");
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused() {
    let (running, ca_pem, dir) = unsynced_webhook(Limits {
        max_body_bytes: 64 * 1024,
        http2: true,
        ..Limits::default()
    })
    .await;
    let addr = running.webhook_addr;
    let url = format!("https://{addr}/mutate-elfmachine");

    // HTTP/1.1: a head beyond --max-header-bytes (16 KiB).
    let tls = TlsConnector::from(Arc::new(tls_client(&ca_pem, &[b"http/1.1"])));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = tls.connect(ServerName::from(addr.ip()), tcp).await.unwrap();
    let head = format!(
        "POST /mutate-elfmachine HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // HTTP/2: a header list beyond the same limit.
    let answer = https(&ca_pem)
        .post(&url)
        .header("x-big", "a".repeat(20 * 1024))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    assert_eq!(answer.status(), 431);

    // A body beyond --max-body-bytes.
    let answer = https(&ca_pem)
        .post(&url)
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    let text = answer.text().await.unwrap();
    assert!(text.contains("--max-body-bytes"), "{text}");
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
