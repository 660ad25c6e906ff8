use clap::Parser;

// One thread: the sidecar waits on the network almost all the time, and every extra runtime
// thread costs a stack and a malloc arena (steady-state RSS; `make bench`). Key generation,
// the one CPU-heavy step, runs on the blocking pool.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    sidecert_sidecar::cli::main(sidecert_sidecar::cli::Cli::parse()).await
}
