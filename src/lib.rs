//! cape-static-ip: a mutating admission webhook that gives Cluster API Provider ELF machines
//! static IPv4 addresses from metal3 IPAM pools, and the background loops that release them.
//!
//! The tree follows the architecture:
//! - [`webhook`]: the front door (HTTPS server, TLS reload, AdmissionReview in/out, patch);
//! - [`assign`]: the allocation use case (select a pool, reserve, write, all or nothing, repair);
//! - [`lifecycle`]: the background loops, one file each (release, reconcile, adopt, sweep,
//!   pool status);
//! - [`ipam`]: the pure core (pool arithmetic, pool selection, the free-address index);
//! - [`cluster`]: the one door to the API (typed CRDs, watch caches, the address index, writes);
//! - [`metrics`], [`events`]: what operators see; [`contract`]: names shared with CAPE and metal3;
//! - [`cli`] and [`cmd`]: the binary's flags and commands.
#![forbid(unsafe_code)]

pub mod assign;
pub mod cli;
pub mod cluster;
pub mod cmd;
pub mod contract;
pub mod events;
pub mod fault;
pub mod ipam;
pub mod lifecycle;
pub mod metrics;
pub mod webhook;

/// Runs one command of the CLI.
pub async fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Serve(args) => cmd::serve::run(*args).await,
        cli::Command::Certs(args) => {
            let cli::CertsArgs { out, hosts, days } = args;
            let generated = webhook::certs::generate(&hosts, days)?;
            webhook::certs::write(&out, &generated)?;
            println!(
                "wrote {}/{{ca.crt,ca.key,tls.crt,tls.key}} for {}",
                out.display(),
                hosts.join(", ")
            );
            Ok(())
        }
        cli::Command::Pools(args) => cmd::pools::run(args).await,
    }
}
