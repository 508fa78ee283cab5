//! cape-static-ip: a mutating admission webhook that gives Cluster API Provider ELF machines
//! static IPv4 addresses from metal3 IPAM pools, and the background loops that release them.
#![forbid(unsafe_code)]

pub mod admission;
pub mod assign;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod contract;
pub mod events;
pub mod http;
pub mod ipam;
pub mod metrics;
pub mod patch;
pub mod pools;
pub mod serve;
pub mod sweeper;
pub mod tls;

/// Runs one command of the CLI.
pub async fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Serve(args) => serve::run(args).await,
        cli::Command::Certs(args) => {
            let cli::CertsArgs { out, hosts, days } = args;
            let generated = certs::generate(&hosts, days)?;
            certs::write(&out, &generated)?;
            println!(
                "wrote {}/{{ca.crt,ca.key,tls.crt,tls.key}} for {}",
                out.display(),
                hosts.join(", ")
            );
            Ok(())
        }
        cli::Command::Pools(args) => pools::run(args).await,
    }
}
