//! `sidecert-e2e plane-dns ...`: the local plane's DNS records for Pebble.

use clap::{Parser, Subcommand};
use sidecert_e2e::dns;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "sidecert's local plane helpers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Keep pebble-challtestsrv's A records in line with the cluster until SIGTERM/SIGINT.
    PlaneDns(dns::Config),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sidecert_e2e::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let Command::PlaneDns(config) = Cli::parse().command;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    dns::run(config, shutdown).await?;
    Ok(())
}

/// The first SIGTERM/SIGINT starts a clean shutdown; a second one exits at once.
async fn signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received; stopping (send again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(1);
}
