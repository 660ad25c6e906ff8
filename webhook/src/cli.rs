//! The top of the crate: a parsed command line dispatched to the server or an offline
//! command. The thin `main` calls [`run`].

use crate::{
    config::{self, Cli, Command},
    error::Result,
    offline, server,
};

/// Installs ring as the process's rustls crypto provider (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs a parsed command line; the thin `main` calls this.
pub async fn run(cli: Cli) -> Result<()> {
    config::init_tracing(&cli.log_format);
    match cli.command {
        Command::Serve(args) => server::serve(*args).await,
        Command::Review(args) => offline::review(args).await,
        Command::Inject(args) => offline::inject(args).await,
        Command::Cleanup(args) => server::cleanup(args).await,
    }
}
