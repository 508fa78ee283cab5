//! Command-line interface: `serve` (the webhook and its background loops), `certs` (dev
//! certificates) and `pools` (what an operator checks first). Every flag can also be set
//! through the environment variable named in its help.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Static IPv4 addresses for CAPE ElfMachines from metal3 IPPools.
#[derive(Debug, Parser)]
#[command(name = "cape-static-ip", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the admission webhook, the release loop and the reconciler.
    Serve(Box<ServeArgs>),
    /// Write a development CA and serving certificate.
    Certs(CertsArgs),
    /// Show every IPPool with its size, used and free addresses, and claims.
    Pools(PoolsArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the HTTPS webhook endpoint. `[::]` is every address of both families
    /// (IPv4-only nodes fall back to `0.0.0.0`).
    #[arg(long, env = "CAPE_STATIC_IP_LISTEN", default_value = "[::]:9443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM); re-read when the file changes.
    #[arg(
        long,
        env = "CAPE_STATIC_IP_TLS_CERT_FILE",
        default_value = "/etc/cape-static-ip/tls/tls.crt"
    )]
    pub tls_cert_file: PathBuf,
    /// Private key of the serving certificate (PEM).
    #[arg(
        long,
        env = "CAPE_STATIC_IP_TLS_KEY_FILE",
        default_value = "/etc/cape-static-ip/tls/tls.key"
    )]
    pub tls_key_file: PathBuf,
    /// Address of the plain-HTTP admin endpoint (/livez, /readyz, /metrics). `[::]` is
    /// every address of both families.
    #[arg(long, env = "CAPE_STATIC_IP_ADMIN_LISTEN", default_value = "[::]:8080")]
    pub admin_listen: SocketAddr,
    /// Namespace searched for default pools after the machine's own.
    #[arg(
        long,
        env = "CAPE_STATIC_IP_DEFAULT_POOL_NAMESPACE",
        default_value = "cape-system"
    )]
    pub default_pool_namespace: String,
    /// How often everything is re-checked, besides reacting to watch events.
    #[arg(long, env = "CAPE_STATIC_IP_RESYNC", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync: Duration,
    /// How long a claim must have been seen unchanged (by this replica's own clock) before
    /// it may be released for want of a machine or of a device carrying its address. Must
    /// exceed the longest admission the apiserver allows (see --apiserver-request-timeout).
    #[arg(long, env = "CAPE_STATIC_IP_CLAIM_GRACE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub claim_grace: Duration,
    /// How long a released address stays out of use ("cooling") while its pool has another
    /// free address (ARP caches, DNS and monitoring still pointing at the old VM). A pool with
    /// no other free address reuses the one released longest ago. 0s: reuse at once.
    #[arg(long, env = "CAPE_STATIC_IP_REUSE_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub reuse_delay: Duration,
    /// The kube-apiserver's `--request-timeout` (60s unless changed): no create can stay in
    /// admission longer, so a claim grace above it (plus a margin) never releases the claim
    /// of a create still in flight.
    #[arg(long, env = "CAPE_STATIC_IP_APISERVER_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub apiserver_request_timeout: Duration,
    /// How often the certificate files are checked for a rotation.
    #[arg(long, env = "CAPE_STATIC_IP_CERT_RELOAD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub cert_reload: Duration,
    /// How long in-flight reviews may take to finish at shutdown.
    #[arg(long, env = "CAPE_STATIC_IP_DRAIN", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// How long to keep answering (while not ready) after SIGTERM before closing the
    /// listener, so the apiserver stops calling this replica first.
    #[arg(long, env = "CAPE_STATIC_IP_SHUTDOWN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
    /// Log format.
    #[arg(
        long,
        env = "CAPE_STATIC_IP_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Deadlines and caps of the server.
    #[command(flatten)]
    pub limits: crate::webhook::listener::Limits,
    /// Who may send reviews.
    #[command(flatten)]
    pub auth: crate::webhook::auth::AuthOptions,
    /// The cap on claims whose machine has not appeared yet.
    #[command(flatten)]
    pub caps: crate::assign::pending::Caps,
}

/// Flags of `certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write ca.crt, ca.key, tls.crt and tls.key into.
    #[arg(long, env = "CAPE_STATIC_IP_CERTS_OUT", default_value = "certs")]
    pub out: PathBuf,
    /// Names and IP addresses the serving certificate is valid for.
    #[arg(
        long = "host",
        env = "CAPE_STATIC_IP_CERTS_HOSTS",
        value_delimiter = ',',
        default_value = "127.0.0.1,localhost,cape-static-ip-webhook.cape-system.svc,cape-static-ip-webhook.cape-system.svc.cluster.local"
    )]
    pub hosts: Vec<String>,
    /// Validity in days.
    #[arg(long, env = "CAPE_STATIC_IP_CERTS_DAYS", default_value_t = 365)]
    pub days: i64,
}

/// Flags of `pools`.
#[derive(Debug, Args)]
pub struct PoolsArgs {
    /// Only this namespace (default: all).
    #[arg(long, short = 'n', env = "CAPE_STATIC_IP_NAMESPACE")]
    pub namespace: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_endpoints_listen_on_every_address_of_both_families_by_default() {
        let cli = Cli::try_parse_from(["cape-static-ip", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        if std::env::var_os("CAPE_STATIC_IP_LISTEN").is_none() {
            assert_eq!(args.listen, "[::]:9443".parse().unwrap());
        }
        if std::env::var_os("CAPE_STATIC_IP_ADMIN_LISTEN").is_none() {
            assert_eq!(args.admin_listen, "[::]:8080".parse().unwrap());
        }
    }
}
