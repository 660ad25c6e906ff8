//! The command line: `issue` and `run`.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use sidecert_contract::{DEFAULT_HTTP01_PORT, KeyAlgorithm, PodIdentity, SidecarConfig, env, parse_domains};
use sidecert_runtime::{parse_duration, shutdown_signal};
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    issue::IssueOptions,
    run::RunOptions,
};

/// The log filter without `--log`, and when the one given does not parse.
pub const DEFAULT_LOG: &str = "info";

#[derive(Debug, Parser)]
#[command(
    name = "sidecert-sidecar",
    version,
    about = "ACME certificates for this Pod's own domains"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "SIDECERT_LOG", default_value = DEFAULT_LOG, global = true)]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One order, no Kubernetes: writes tls.crt and tls.key to --cert-dir and exits.
    Issue(Box<IssueArgs>),
    /// The injected sidecar (configuration from env, flags override).
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Comma-separated domains, all in one certificate.
    #[arg(long)]
    pub domains: String,
    /// ACME directory URL (or letsencrypt / letsencrypt-staging).
    #[arg(long)]
    pub acme_server: String,
    /// PEM file with the CA(s) to trust for the ACME server's HTTPS.
    #[arg(long)]
    pub acme_ca_file: Option<PathBuf>,
    #[arg(long)]
    pub cert_dir: PathBuf,
    /// Where the HTTP-01 responder listens.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_HTTP01_PORT)))]
    pub http01_listen: SocketAddr,
    #[arg(long, default_value_t = KeyAlgorithm::default())]
    pub key_algorithm: KeyAlgorithm,
    /// ACME profile (e.g. shortlived); named as for `run`.
    #[arg(long = "acme-profile", visible_alias = "profile")]
    pub profile: Option<String>,
    #[arg(long)]
    pub email: Option<String>,
    #[arg(long, requires = "eab_hmac_key")]
    pub eab_key_id: Option<String>,
    #[arg(long, requires = "eab_key_id")]
    pub eab_hmac_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Certificates as JSON (overrides SIDECERT_CERTIFICATES).
    #[arg(long)]
    pub certificates: Option<String>,
    #[arg(long)]
    pub acme_server: Option<String>,
    #[arg(long)]
    pub acme_email: Option<String>,
    #[arg(long)]
    pub acme_profile: Option<String>,
    /// PEM file to trust for the ACME server (overrides SIDECERT_ACME_CA_BUNDLE).
    #[arg(long)]
    pub acme_ca_file: Option<PathBuf>,
    #[arg(long)]
    pub key_algorithm: Option<String>,
    #[arg(long)]
    pub reload_url: Option<String>,
    #[arg(long)]
    pub eab_secret: Option<String>,
    /// HTTP-01 listen address (default: the Pod IP, else 0.0.0.0, on SIDECERT_HTTP01_PORT).
    #[arg(long)]
    pub http01_listen: Option<SocketAddr>,
    /// Metrics listen address (default 0.0.0.0 on SIDECERT_METRICS_PORT).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Also write tls.crt/tls.key here (atomic swap).
    #[arg(long, env = "SIDECERT_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Namespace (default: SIDECERT_POD_NAMESPACE, else the client's default).
    #[arg(long)]
    pub namespace: Option<String>,
    #[arg(long)]
    pub pod_name: Option<String>,
    #[arg(long)]
    pub pod_ip: Option<String>,
    /// Use ACME Renewal Information when the CA offers it.
    #[arg(long, env = "SIDECERT_ARI", default_value_t = true, action = clap::ArgAction::Set)]
    pub ari: bool,
    /// First retry delay after a failed order (`30s`, `5m`, or seconds).
    #[arg(long, env = "SIDECERT_RETRY_BASE", default_value = "60s", value_parser = parse_duration)]
    pub retry_base: Duration,
    /// Longest delay between failed orders.
    #[arg(long, env = "SIDECERT_RETRY_CAP", default_value = "4h", value_parser = parse_duration)]
    pub retry_cap: Duration,
    /// Lease duration (clamped to 5 s .. 5 min).
    #[arg(long, env = "SIDECERT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// Ingress certificates: longest wait for the solver Service to have a ready endpoint
    /// before the CA is told to validate (then it is told anyway, with a warning).
    #[arg(long, env = "SIDECERT_ROUTE_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub route_wait: Duration,
    /// Ingress certificates: delay after the endpoint appears, for the ingress controller to
    /// route to it. Traefik applies a change at most every 2 s (its
    /// `providers.providersThrottleDuration`) and sees the endpoint through a watch first:
    /// with 1 s, two of four first orders on the plane failed validation with a 404.
    #[arg(long, env = "SIDECERT_ROUTE_SETTLE", default_value = "3s", value_parser = parse_duration)]
    pub route_settle: Duration,
    /// Delay before the reload URL is called. Default: 0 with --cert-dir (the files are in
    /// place), else 90s: an app reading the Secret through a volume sees the new files only
    /// after the kubelet's next sync (up to about a minute).
    #[arg(long, env = "SIDECERT_RELOAD_DELAY", value_parser = parse_duration)]
    pub reload_delay: Option<Duration>,
}

/// [`RunArgs::reload_delay`] without the flag: the app reads the Secret through a volume.
pub const RELOAD_DELAY_FOR_VOLUMES: Duration = Duration::from_secs(90);

/// Runs the command; maps errors to a message and a non-zero exit code.
pub async fn main(cli: Cli) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Issue(args) => issue(*args).await,
        Command::Run(args) => run(*args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecert-sidecar: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_file(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))
}

async fn issue(args: IssueArgs) -> Result<()> {
    let opts = IssueOptions {
        domains: parse_domains(&args.domains)?,
        directory: sidecert_contract::resolve_acme_server(&args.acme_server)?,
        ca_bundle_pem: args.acme_ca_file.as_ref().map(read_file).transpose()?,
        cert_dir: args.cert_dir,
        http01_listen: args.http01_listen,
        key_algorithm: args.key_algorithm,
        profile: args.profile,
        email: args.email,
        eab: args.eab_key_id.zip(args.eab_hmac_key),
    };
    let issued = crate::issue::issue(&opts).await?;
    println!(
        "issued {} (valid until {}) -> {}",
        opts.domains.join(","),
        crate::certificate::x509::rfc3339(issued.info.lifetime.not_after),
        opts.cert_dir.display()
    );
    Ok(())
}

/// Builds the run options from the flags, then the env.
pub fn run_options(args: &RunArgs, getenv: impl Fn(&str) -> Option<String>) -> Result<RunOptions> {
    let mut over: HashMap<&str, String> = HashMap::new();
    let pairs = [
        (env::CERTIFICATES, &args.certificates),
        (env::ACME_SERVER, &args.acme_server),
        (env::ACME_EMAIL, &args.acme_email),
        (env::ACME_PROFILE, &args.acme_profile),
        (env::KEY_ALGORITHM, &args.key_algorithm),
        (env::RELOAD_URL, &args.reload_url),
        (env::EAB_SECRET, &args.eab_secret),
        (env::POD_NAME, &args.pod_name),
        (env::POD_IP, &args.pod_ip),
        (env::POD_NAMESPACE, &args.namespace),
    ];
    for (k, v) in pairs {
        if let Some(v) = v {
            over.insert(k, v.clone());
        }
    }
    if let Some(path) = &args.acme_ca_file {
        over.insert(env::ACME_CA_BUNDLE, read_file(path)?);
    }
    let get = |k: &str| over.get(k).cloned().or_else(|| getenv(k));
    let config = SidecarConfig::from_env(get)?;
    let pod = PodIdentity::from_env(get);
    let ip = match pod.ip.as_deref() {
        Some(ip) => ip
            .parse()
            .map_err(|e| Error::config_from(format!("{}: {ip:?} is not an IP address", env::POD_IP), e))?,
        None => std::net::IpAddr::from([0, 0, 0, 0]),
    };
    Ok(RunOptions {
        http01_listen: args
            .http01_listen
            .unwrap_or(SocketAddr::new(ip, config.http01_port)),
        metrics_listen: args
            .metrics_listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], config.metrics_port))),
        namespace: pod.namespace.clone().unwrap_or_default(),
        cert_dir: args.cert_dir.clone(),
        ari: args.ari,
        retry_base: args.retry_base,
        retry_cap: args.retry_cap,
        lease_duration: args.lease_duration,
        route_wait: args.route_wait,
        route_settle: args.route_settle,
        reload_delay: args.reload_delay.unwrap_or(if args.cert_dir.is_some() {
            Duration::ZERO
        } else {
            RELOAD_DELAY_FOR_VOLUMES
        }),
        config,
        pod,
    })
}

async fn run(args: RunArgs) -> Result<()> {
    let mut opts = run_options(&args, |k| std::env::var(k).ok())?;
    let client = kube::Client::try_default().await?;
    if opts.namespace.is_empty() {
        opts.namespace = client.default_namespace().to_owned();
    }
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
        shutdown_signal().await;
        std::process::exit(130);
    });
    crate::run::run(opts, client, shutdown).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CERTIFICATES: &str = r#"[{"secretName":"web-tls","domains":["a.example"]}]"#;

    /// The `run` flags after `sidecert-sidecar run`.
    fn run_args(flags: &[&str]) -> RunArgs {
        let argv = ["sidecert-sidecar", "run"].iter().chain(flags);
        let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not run")
        };
        *args
    }

    /// [`run_options`] for `flags` and an environment of `envs` plus the certificates.
    fn options(flags: &[&str], envs: &[(&str, &str)]) -> Result<RunOptions> {
        let envs: HashMap<&str, &str> = envs
            .iter()
            .copied()
            .chain([(env::CERTIFICATES, CERTIFICATES)])
            .collect();
        run_options(&run_args(flags), |k| envs.get(k).map(|v| (*v).to_owned()))
    }

    #[test]
    fn flags_override_env() {
        let opts = options(
            &["--acme-server", "https://flag/dir", "--ari=false"],
            &[
                (env::ACME_SERVER, "https://env/dir"),
                (env::POD_IP, "10.213.0.12"),
                (env::POD_NAMESPACE, "shop"),
            ],
        )
        .unwrap();
        assert_eq!(opts.config.acme_server, "https://flag/dir");
        assert_eq!(opts.http01_listen, "10.213.0.12:8089".parse().unwrap());
        assert_eq!(opts.namespace, "shop");
        assert!(!opts.ari);
        assert_eq!(opts.route_wait, Duration::from_secs(60));
        assert_eq!(opts.route_settle, Duration::from_secs(3));
        assert_eq!(
            opts.reload_delay,
            Duration::from_secs(90),
            "no --cert-dir: after the kubelet's sync"
        );
    }

    #[test]
    fn durations_take_the_webhooks_syntax() {
        let flags = [
            "--retry-base",
            "30s",
            "--retry-cap",
            "2h",
            "--lease-duration",
            "20",
            "--route-wait",
            "2m",
            "--route-settle",
            "500ms",
            "--reload-delay",
            "0s",
        ];
        let opts = options(&flags, &[(env::ACME_SERVER, "letsencrypt")]).unwrap();
        assert_eq!(opts.retry_base, Duration::from_secs(30));
        assert_eq!(opts.retry_cap, Duration::from_secs(7200));
        assert_eq!(
            opts.lease_duration,
            Duration::from_secs(20),
            "a plain number is seconds"
        );
        assert_eq!(opts.route_wait, Duration::from_secs(120));
        assert_eq!(opts.route_settle, Duration::from_millis(500));
        assert_eq!(opts.reload_delay, Duration::ZERO);
        // The defaults, declared once (in the flags).
        let args = run_args(&[]);
        assert_eq!(args.retry_base, Duration::from_secs(60));
        assert_eq!(args.retry_cap, Duration::from_secs(4 * 3600));
        assert_eq!(args.lease_duration, Duration::from_secs(15));
        assert!(Cli::try_parse_from(["x", "run", "--retry-base", "5y"]).is_err());
    }

    #[test]
    fn bad_pod_ip_is_named() {
        let err = options(&[], &[(env::ACME_SERVER, "letsencrypt"), (env::POD_IP, "nope")]).unwrap_err();
        assert!(err.to_string().contains("SIDECERT_POD_IP"), "{err}");
    }
}
