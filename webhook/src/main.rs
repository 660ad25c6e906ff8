use std::process::ExitCode;

use clap::Parser;
use sidecert_webhook::{config::Cli, install_crypto_provider, run};

#[tokio::main]
async fn main() -> ExitCode {
    install_crypto_provider();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
