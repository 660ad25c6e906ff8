//! The command line: one clap `Parser`; every flag also reads a `SIDECERT_WEBHOOK_*` variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use sidecert_contract::KeyAlgorithm;

/// sidecert's admission webhook: sidecar injection, HTTP-01 routing, temporary certificates.
#[derive(Debug, Parser)]
#[command(name = "sidecert-webhook", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SIDECERT_WEBHOOK_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve admission reviews over HTTPS.
    Serve(ServeArgs),
    /// Read one AdmissionReview and print the response the server would give (no side effects).
    Review(ReviewArgs),
    /// Inject the sidecar into the pod templates of YAML manifests that ask for it.
    Inject(InjectArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HTTPS address for /mutate, /healthz and /readyz.
    #[arg(long, env = "SIDECERT_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address for /metrics.
    #[arg(long, env = "SIDECERT_WEBHOOK_METRICS_LISTEN", default_value = "0.0.0.0:9443")]
    pub metrics_listen: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when it changes.
    #[arg(long, env = "SIDECERT_WEBHOOK_TLS_CERT_FILE")]
    pub tls_cert_file: PathBuf,
    /// Serving private key (PEM); reloaded when it changes.
    #[arg(long, env = "SIDECERT_WEBHOOK_TLS_KEY_FILE")]
    pub tls_key_file: PathBuf,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "SIDECERT_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// HTTP worker threads (default: one per CPU).
    #[arg(long, env = "SIDECERT_WEBHOOK_WORKERS")]
    pub workers: Option<usize>,
    /// Time budget for the side effects of one review (the API server's webhook timeout is 10 s).
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDE_EFFECT_TIMEOUT", default_value = "4s", value_parser = parse_duration)]
    pub side_effect_timeout: Duration,
    /// How long in-flight reviews may take to finish after SIGTERM.
    #[arg(long, env = "SIDECERT_WEBHOOK_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Kubeconfig file (default: in-cluster config, then $KUBECONFIG).
    #[arg(long, env = "SIDECERT_WEBHOOK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub mutation: MutationArgs,
}

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// AdmissionReview JSON file; `-` or absent reads stdin.
    #[arg(short = 'f', long = "filename", env = "SIDECERT_WEBHOOK_REVIEW_FILE")]
    pub file: Option<PathBuf>,
    /// Look Ingresses and Services up in this cluster (otherwise Pods need explicit annotations).
    #[arg(long, env = "SIDECERT_WEBHOOK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub mutation: MutationArgs,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// YAML manifests (multi-document); `-` reads stdin.
    #[arg(short = 'f', long = "filename", env = "SIDECERT_WEBHOOK_INJECT_FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub mutation: MutationArgs,
}

/// How the sidecar is built and which ACME defaults it gets.
#[derive(Debug, Clone, Args)]
pub struct MutationArgs {
    /// Sidecar image.
    #[arg(
        long,
        env = "SIDECERT_WEBHOOK_SIDECAR_IMAGE",
        default_value = "ghcr.io/sidecert/sidecar:0.1.0"
    )]
    pub sidecar_image: String,
    /// Sidecar image pull policy.
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: String,
    /// Sidecar CPU request.
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_CPU_REQUEST", default_value = "10m")]
    pub sidecar_cpu_request: String,
    /// Sidecar memory request.
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_MEMORY_REQUEST", default_value = "16Mi")]
    pub sidecar_memory_request: String,
    /// Sidecar CPU limit (empty: none).
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_CPU_LIMIT", default_value = "")]
    pub sidecar_cpu_limit: String,
    /// Sidecar memory limit (empty: none).
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_MEMORY_LIMIT", default_value = "64Mi")]
    pub sidecar_memory_limit: String,
    /// Native sidecar (init container with restartPolicy Always). `auto`: when the API server
    /// is 1.29 or newer (asked once at start; offline without a cluster: native).
    #[arg(long, env = "SIDECERT_WEBHOOK_NATIVE_SIDECARS", default_value = "auto")]
    pub native_sidecars: NativeSidecars,
    /// Default ACME server: letsencrypt, letsencrypt-staging or a directory URL.
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_SERVER", default_value = "letsencrypt")]
    pub acme_server: String,
    /// Default ACME account email.
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// Default ACME profile.
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_PROFILE")]
    pub acme_profile: Option<String>,
    /// Default key algorithm: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096.
    #[arg(long, env = "SIDECERT_WEBHOOK_KEY_ALGORITHM", default_value = "ecdsa-p256")]
    pub key_algorithm: KeyAlgorithm,
    /// Secret (in the Pod's namespace) with keyId and hmacKey for external account binding.
    #[arg(long, env = "SIDECERT_WEBHOOK_EAB_SECRET")]
    pub eab_secret: Option<String>,
    /// PEM bundle the sidecar trusts for the ACME server's HTTPS (private CAs, Pebble).
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_CA_BUNDLE_FILE")]
    pub acme_ca_bundle_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NativeSidecars {
    Auto,
    Always,
    Never,
}

/// Parses `500ms`, `2s`, `1m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Sets up logging on stderr (stdout carries the offline commands' output).
pub fn init_tracing(format: &LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
