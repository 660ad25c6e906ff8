use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sidecert_sidecar::cli::main(sidecert_sidecar::cli::Cli::parse()).await
}
