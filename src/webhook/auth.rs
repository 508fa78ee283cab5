//! Who may make the webhook write. A CREATE review makes an IPClaim and an IPAddress, so a
//! review is believed only when it comes from the apiserver: kube-apiserver presents the
//! credentials its AdmissionConfiguration (`kubeConfigFile`) gives for our host, either a client
//! certificate (verified here against `--auth-client-ca-file`) or a bearer token (verified by a
//! TokenReview, cached briefly). The identity must be one of `--auth-allowed-users` /
//! `--auth-allowed-groups`.
//!
//! At the TLS layer a client certificate is asked for but optional (probes and tools without
//! one still connect; a certificate from another CA does not break the handshake, so `warn`
//! mode never turns a misconfiguration into an outage); the chain is verified per request,
//! before anything is decided. `--auth-mode` chooses what happens to a review without valid
//! credentials: `off` (not checked), `warn` (counted and logged, then served), `enforce`
//! (refused with 401/403 before anything is written).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::assign::pending::Budget;
use crate::metrics::{AuthLabels, Metrics};
use crate::webhook::review::Decision;

/// What happens to a review whose caller is not verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Credentials are not checked.
    #[default]
    Off,
    /// Checked; a review without valid credentials is counted, logged and served.
    Warn,
    /// Checked; a review without valid credentials is refused before anything is written.
    Enforce,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Warn => "warn",
            Mode::Enforce => "enforce",
        }
    }
}

/// The flags of caller authentication (`serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthOptions {
    /// What happens to a review without valid credentials: off (not checked), warn (served,
    /// counted and logged) or enforce (refused before anything is written). Enforce is
    /// recommended and is what `manifests/` and `make run` use; the binary's default is warn,
    /// so that a webhook started without credentials configured keeps serving (bounded by the
    /// pending-claims cap) instead of refusing to start.
    #[arg(
        long = "auth-mode",
        env = "CAPE_STATIC_IP_AUTH_MODE",
        value_enum,
        default_value = "warn"
    )]
    pub mode: Mode,
    /// CA bundle (PEM) that signs the client certificate the apiserver presents (kubeadm: the
    /// cluster CA, which every pod has in its service account's ca.crt). Re-read when it changes.
    #[arg(
        long = "auth-client-ca-file",
        env = "CAPE_STATIC_IP_AUTH_CLIENT_CA_FILE"
    )]
    pub client_ca_file: Option<PathBuf>,
    /// Accept a bearer token, verified by a TokenReview (needs `create tokenreviews`).
    #[arg(long = "auth-token-review", env = "CAPE_STATIC_IP_AUTH_TOKEN_REVIEW")]
    pub token_review: bool,
    /// Identities allowed to send reviews (certificate CN or token user name), comma separated.
    #[arg(
        long = "auth-allowed-users",
        env = "CAPE_STATIC_IP_AUTH_ALLOWED_USERS",
        value_delimiter = ','
    )]
    pub allowed_users: Vec<String>,
    /// Groups allowed to send reviews (certificate O or token groups), comma separated.
    #[arg(
        long = "auth-allowed-groups",
        env = "CAPE_STATIC_IP_AUTH_ALLOWED_GROUPS",
        value_delimiter = ','
    )]
    pub allowed_groups: Vec<String>,
    /// How long an accepted token is trusted without another TokenReview.
    #[arg(long = "auth-token-cache-ttl", env = "CAPE_STATIC_IP_AUTH_TOKEN_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub token_cache_ttl: Duration,
    /// How long a refused token stays refused without another TokenReview.
    #[arg(long = "auth-token-negative-cache-ttl", env = "CAPE_STATIC_IP_AUTH_TOKEN_NEGATIVE_CACHE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub token_negative_cache_ttl: Duration,
    /// At most this many tokens are remembered (the oldest are forgotten first).
    #[arg(
        long = "auth-token-cache-size",
        env = "CAPE_STATIC_IP_AUTH_TOKEN_CACHE_SIZE",
        default_value_t = 1024
    )]
    pub token_cache_size: usize,
}

impl AuthOptions {
    /// No authentication (what a library user gets unless it asks; the CLI's default is
    /// `enforce`).
    pub fn off() -> Self {
        AuthOptions {
            mode: Mode::Off,
            client_ca_file: None,
            token_review: false,
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            token_cache_ttl: Duration::from_secs(60),
            token_negative_cache_ttl: Duration::from_secs(10),
            token_cache_size: 1024,
        }
    }

    /// Refuses combinations that cannot work, saying what to set.
    pub fn validate(&self) -> Result<(), String> {
        let sources = self.client_ca_file.is_some() || self.token_review;
        if self.mode == Mode::Enforce && !sources {
            return Err("--auth-mode=enforce needs a way to verify the apiserver: --auth-client-ca-file (client certificate) and/or --auth-token-review (bearer token); see the README section \"Who may call the webhook\", or run with --auth-mode=warn (or off) where the apiserver cannot present credentials".into());
        }
        if self.mode != Mode::Off
            && sources
            && self.allowed_users.is_empty()
            && self.allowed_groups.is_empty()
        {
            return Err("--auth-client-ca-file / --auth-token-review accept any identity their CA or the cluster knows: name the apiserver's identity with --auth-allowed-users (e.g. kube-apiserver-kubelet-client) or --auth-allowed-groups".into());
        }
        if self.token_cache_size == 0 {
            return Err("--auth-token-cache-size must be at least 1".into());
        }
        Ok(())
    }
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

/// Why a caller is not verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 (no or invalid credentials), 403 (valid but not allowed), 503 (could not check).
    pub code: u16,
    /// Metric label.
    pub reason: &'static str,
    pub detail: String,
}

/// The certificate chain a TLS client presented (DER, leaf first), which the listener puts in
/// the extensions of every request of that connection.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificates(pub Arc<Vec<Vec<u8>>>);

impl PeerCertificates {
    /// What the client of `connection` presented, if anything.
    pub fn of(connection: &rustls::ServerConnection) -> Option<Self> {
        let chain = connection.peer_certificates()?;
        Some(PeerCertificates(Arc::new(
            chain.iter().map(|c| c.as_ref().to_vec()).collect(),
        )))
    }
}

/// What a request carries: the TLS client certificate chain and the bearer token, if any.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub certificates: Vec<Vec<u8>>,
    pub bearer: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Credentials {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let certificates = parts
            .extensions
            .get::<PeerCertificates>()
            .map(|p| p.0.to_vec())
            .unwrap_or_default();
        let bearer = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Ok(Credentials {
            certificates,
            bearer,
        })
    }
}

/// The client CA, re-read when its file changes.
struct ClientCa {
    path: PathBuf,
    current: RwLock<(Vec<u8>, Arc<dyn ClientCertVerifier>)>,
    provider: Arc<CryptoProvider>,
}

fn load_ca(
    path: &std::path::Path,
    provider: &Arc<CryptoProvider>,
) -> Result<(Vec<u8>, Arc<dyn ClientCertVerifier>), String> {
    let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate in PEM", path.display()));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((pem, verifier))
}

impl ClientCa {
    fn verify(&self, chain: &[Vec<u8>]) -> Result<(), String> {
        let verifier = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        let end_entity = CertificateDer::from(chain[0].as_slice());
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        verifier
            .verify_client_cert(&end_entity, &intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn reload(&self) -> Result<bool, String> {
        let pem = std::fs::read(&self.path)
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?;
        if self.current.read().unwrap_or_else(|e| e.into_inner()).0 == pem {
            return Ok(false);
        }
        let loaded = load_ca(&self.path, &self.provider)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(true)
    }
}

/// The subject's CN (user) and O (groups), as the apiserver itself reads client certificates.
fn identity_of(der: &[u8]) -> Result<Identity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Ok(Identity { user, groups })
}

/// What a TokenReview said.
#[derive(Debug, Clone)]
enum Reviewed {
    Authenticated(Identity),
    Rejected(String),
}

type ReviewFuture = Shared<BoxFuture<'static, Result<Reviewed, String>>>;

enum Cached {
    /// A TokenReview for this token is in flight: later requests wait for the same answer.
    InFlight(ReviewFuture),
    Done {
        at: Instant,
        answer: Reviewed,
    },
}

/// TokenReviews, cached by the token's SHA-256 (the token itself is not kept).
struct TokenReviewer {
    client: Client,
    ttl: Duration,
    negative_ttl: Duration,
    size: usize,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl TokenReviewer {
    fn fresh(&self, at: Instant, answer: &Reviewed) -> bool {
        let ttl = match answer {
            Reviewed::Authenticated(_) => self.ttl,
            Reviewed::Rejected(_) => self.negative_ttl,
        };
        at.elapsed() < ttl
    }

    async fn review(&self, token: &str) -> Result<Reviewed, String> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let shared = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(&key) {
                Some(Cached::Done { at, answer }) if self.fresh(*at, answer) => {
                    return Ok(answer.clone());
                }
                Some(Cached::InFlight(f)) => f.clone(),
                _ => {
                    if cache.len() >= self.size {
                        self.evict(&mut cache);
                    }
                    let client = self.client.clone();
                    let token = token.to_string();
                    let f = async move { token_review(client, token).await }
                        .boxed()
                        .shared();
                    cache.insert(key, Cached::InFlight(f.clone()));
                    f
                }
            }
        };
        let answer = shared.await;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match &answer {
            Ok(reviewed) => {
                if matches!(cache.get(&key), Some(Cached::InFlight(_))) {
                    cache.insert(
                        key,
                        Cached::Done {
                            at: Instant::now(),
                            answer: reviewed.clone(),
                        },
                    );
                }
            }
            // Not cached: the next request asks again.
            Err(_) => {
                if matches!(cache.get(&key), Some(Cached::InFlight(_))) {
                    cache.remove(&key);
                }
            }
        }
        answer
    }

    /// Makes room: drops stale answers, then the oldest ones.
    fn evict(&self, cache: &mut HashMap<[u8; 32], Cached>) {
        cache.retain(|_, c| match c {
            Cached::InFlight(_) => true,
            Cached::Done { at, answer } => self.fresh(*at, answer),
        });
        while cache.len() >= self.size {
            let oldest = cache
                .iter()
                .filter_map(|(k, c)| match c {
                    Cached::Done { at, .. } => Some((*at, *k)),
                    Cached::InFlight(_) => None,
                })
                .min();
            match oldest {
                Some((_, k)) => {
                    cache.remove(&k);
                }
                None => break,
            }
        }
    }
}

async fn token_review(client: Client, token: String) -> Result<Reviewed, String> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: None,
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client)
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| format!("TokenReview failed: {e}"))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status
            .error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "the token is not valid".into());
        return Ok(Reviewed::Rejected(why));
    }
    let user = status.user.unwrap_or_default();
    Ok(Reviewed::Authenticated(Identity {
        user: user.username.unwrap_or_default(),
        groups: user.groups.unwrap_or_default(),
    }))
}

/// Checks callers of the webhook.
pub struct Authenticator {
    mode: Mode,
    users: BTreeSet<String>,
    groups: BTreeSet<String>,
    ca: Option<ClientCa>,
    tokens: Option<TokenReviewer>,
    metrics: Arc<Metrics>,
    /// When an unverified review was last logged (ms since start), to keep a flood out of
    /// the logs; every one is counted.
    last_log_ms: AtomicU64,
    started: Instant,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .finish()
    }
}

/// At most one log line per this period for reviews without valid credentials.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Authenticator {
    /// Checks nothing.
    pub fn off(metrics: Arc<Metrics>) -> Self {
        Self::build(AuthOptions::off(), None, None, metrics)
    }

    /// Loads the client CA (when configured); fails when it does not load.
    pub fn new(
        options: AuthOptions,
        client: Client,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        options.validate()?;
        if options.mode == Mode::Off {
            return Ok(Self::off(metrics));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = match &options.client_ca_file {
            Some(path) => {
                let current = load_ca(path, &provider)?;
                Some(ClientCa {
                    path: path.clone(),
                    current: RwLock::new(current),
                    provider,
                })
            }
            None => None,
        };
        let tokens = options.token_review.then(|| TokenReviewer {
            client,
            ttl: options.token_cache_ttl,
            negative_ttl: options.token_negative_cache_ttl,
            size: options.token_cache_size,
            cache: Mutex::new(HashMap::new()),
        });
        Ok(Self::build(options, ca, tokens, metrics))
    }

    fn build(
        options: AuthOptions,
        ca: Option<ClientCa>,
        tokens: Option<TokenReviewer>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Authenticator {
            mode: options.mode,
            users: options.allowed_users.into_iter().collect(),
            groups: options.allowed_groups.into_iter().collect(),
            ca,
            tokens,
            metrics,
            last_log_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The verifier for the TLS layer when client certificates are checked: it asks for a
    /// certificate but does not require one.
    pub fn tls_verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        let ca = self.ca.as_ref()?;
        Some(Arc::new(RequestClientCert {
            algorithms: ca.provider.signature_verification_algorithms,
        }))
    }

    /// Re-reads the client CA every `period` until the task is dropped (a CA that does not
    /// load is logged and the current one kept).
    pub async fn watch_ca(self: Arc<Self>, period: Duration) {
        let Some(ca) = &self.ca else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match ca.reload() {
                Ok(true) => tracing::info!(ca = %ca.path.display(), "client CA reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "new client CA not loaded; keeping the current one")
                }
            }
        }
    }

    /// Who sent the request, or why that is not known.
    pub async fn verify(&self, credentials: &Credentials) -> Result<Identity, Refusal> {
        let mut first_failure = None;
        if let (Some(ca), false) = (&self.ca, credentials.certificates.is_empty()) {
            match ca
                .verify(&credentials.certificates)
                .and_then(|()| identity_of(&credentials.certificates[0]))
            {
                Ok(identity) => match self.allowed(&identity, "client certificate") {
                    Ok(()) => return Ok(identity),
                    Err(r) => first_failure = Some(r),
                },
                Err(e) => {
                    first_failure = Some(Refusal {
                        code: 401,
                        reason: "bad_certificate",
                        detail: format!("its client certificate is not accepted ({e})"),
                    })
                }
            }
        }
        if let (Some(tokens), Some(token)) = (&self.tokens, &credentials.bearer) {
            let refusal = match tokens.review(token).await {
                Ok(Reviewed::Authenticated(identity)) => {
                    match self.allowed(&identity, "bearer token") {
                        Ok(()) => return Ok(identity),
                        Err(r) => r,
                    }
                }
                Ok(Reviewed::Rejected(why)) => Refusal {
                    code: 401,
                    reason: "token_rejected",
                    detail: format!("its bearer token is not valid ({why})"),
                },
                Err(e) => Refusal {
                    code: 503,
                    reason: "token_review_failed",
                    detail: format!("its bearer token could not be checked ({e}); retry"),
                },
            };
            first_failure.get_or_insert(refusal);
        }
        Err(first_failure.unwrap_or_else(|| {
            let mut accepted = Vec::new();
            if self.ca.is_some() {
                accepted.push("a client certificate signed by --auth-client-ca-file");
            }
            if self.tokens.is_some() {
                accepted.push("a bearer token (TokenReview)");
            }
            Refusal {
                code: 401,
                reason: "no_credentials",
                detail: format!(
                    "it carries no credentials (accepted: {})",
                    if accepted.is_empty() {
                        "none configured".to_string()
                    } else {
                        accepted.join(" or ")
                    }
                ),
            }
        }))
    }

    fn allowed(&self, identity: &Identity, via: &str) -> Result<(), Refusal> {
        if self.users.contains(&identity.user)
            || identity.groups.iter().any(|g| self.groups.contains(g))
        {
            return Ok(());
        }
        Err(Refusal {
            code: 403,
            reason: "identity_not_allowed",
            detail: format!(
                "its {via} identifies user {:?} (groups {:?}), which is not in --auth-allowed-users or --auth-allowed-groups",
                identity.user, identity.groups
            ),
        })
    }

    /// Decides whether a review may go on, and from which budget of pending claims
    /// ([`crate::assign::pending`]) it draws: `Err` carries the denial (enforce mode only).
    pub async fn admit(&self, credentials: &Credentials) -> Result<Budget, Decision> {
        if self.mode == Mode::Off {
            return Ok(Budget::Unverified);
        }
        let refusal = match self.verify(credentials).await {
            Ok(_) => return Ok(Budget::Verified),
            Err(r) => r,
        };
        self.metrics
            .unauthenticated
            .get_or_create(&AuthLabels {
                mode: self.mode.as_str().into(),
                reason: refusal.reason.into(),
            })
            .inc();
        self.log(&refusal);
        if self.mode == Mode::Warn {
            return Ok(Budget::Unverified);
        }
        Err(Decision::Deny {
            code: refusal.code,
            message: format!(
                "cape-static-ip accepts reviews only from the apiserver, and this one is refused before anything is written: {}. Give the apiserver credentials for this webhook in its AdmissionConfiguration (kubeConfigFile), or run the webhook with --auth-mode=warn; see the README section \"Who may call the webhook\"",
                refusal.detail
            ),
        })
    }

    fn log(&self, refusal: &Refusal) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < LOG_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .last_log_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        tracing::warn!(mode = self.mode.as_str(), reason = refusal.reason, detail = %refusal.detail,
            "a review without valid credentials (logged at most every 10s; all are counted in cape_static_ip_unauthenticated_reviews_total)");
    }
}

/// Asks TLS clients for a certificate without requiring one, and checks only that the client
/// holds the certificate's key; the chain is verified per request by [`Authenticator::verify`].
#[derive(Debug)]
struct RequestClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for RequestClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client sends its certificate whatever CA signed it.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(mode: Mode) -> AuthOptions {
        AuthOptions {
            mode,
            ..AuthOptions::off()
        }
    }

    #[test]
    fn impossible_combinations_are_refused_with_the_flag_to_set() {
        let e = options(Mode::Enforce).validate().unwrap_err();
        assert!(e.contains("--auth-client-ca-file"), "{e}");
        let mut o = options(Mode::Enforce);
        o.token_review = true;
        let e = o.validate().unwrap_err();
        assert!(e.contains("--auth-allowed-users"), "{e}");
        o.allowed_groups = vec!["g".into()];
        o.validate().unwrap();
        options(Mode::Warn).validate().unwrap();
        options(Mode::Off).validate().unwrap();
    }

    #[test]
    fn certificate_subject_gives_user_and_groups() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "kubeadm:cluster-admins");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            identity_of(cert.der()).unwrap(),
            Identity {
                user: "kube-apiserver-kubelet-client".into(),
                groups: vec!["kubeadm:cluster-admins".into()],
            }
        );
    }
}
