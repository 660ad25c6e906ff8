//! The command line: one clap `Parser`; every flag also reads a `SIDECERT_WEBHOOK_*` variable.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use sidecert_contract::KeyAlgorithm;
pub use sidecert_runtime::{limit::Reserved, parse_duration};

/// The default of every flag that has one and that code also builds (the `Default` impls
/// below): written once, read by clap and by `Default`.
pub mod defaults {
    pub const ROLLOUT_RESTART: bool = true;
    pub const LEADER_LEASE_NAME: &str = "sidecert-webhook-leader";
    pub const LEADER_LEASE_DURATION: &str = "15s";
    pub const RECONCILE_NAMESPACE_SELECTOR: &str = concat!(sidecert_contract::key!("injection"), "=enabled");
    pub const RECONCILE_INTERVAL: &str = "5m";
    pub const HOST_CLAIM_RELEASE_AFTER: &str = "15m";
    pub const CA_SECRET_NAME: &str = "sidecert-webhook-ca";
    pub const SERVICE_NAME: &str = "sidecert-webhook";
    pub const WEBHOOK_CONFIGURATION_NAME: &str = "sidecert";
    pub const CA_VALIDITY: &str = "365d";
    pub const CA_ROTATE_BEFORE: &str = "90d";
    pub const SERVING_VALIDITY: &str = "7d";
    pub const SERVING_ROTATE_BEFORE: &str = "2d";
    pub const CA_ROLLOVER_DELAY: &str = "30s";
    pub const SIDECAR_IMAGE: &str = "ghcr.io/sidecert/sidecar:0.1.0";
    pub const SIDECAR_IMAGE_PULL_POLICY: &str = "IfNotPresent";
    pub const SIDECAR_CPU_REQUEST: &str = "10m";
    pub const SIDECAR_MEMORY_REQUEST: &str = "16Mi";
    pub const SIDECAR_CPU_LIMIT: &str = "";
    pub const SIDECAR_MEMORY_LIMIT: &str = "64Mi";
    pub const ACME_SERVER: &str = "letsencrypt";
    pub const REQUEST_READ_TIMEOUT: &str = "5s";
    pub const MAX_CONNECTIONS: u32 = 512;
    pub const MAX_CONNECTIONS_PER_ADDRESS: u32 = 128;
    pub const MAX_CONCURRENT_REVIEWS: u32 = 32;
    pub const MAX_CONCURRENT_REVIEWS_PER_ADDRESS: u32 = 16;
}

/// A duration default of [`defaults`] (checked by the tests: clap parses the same strings).
fn default_duration(s: &str) -> Duration {
    parse_duration(s).unwrap_or_default()
}

/// The shortest `--host-claim-release-after`: as long as a claim never seen in use lasts
/// (`kube::claims::PROVISIONAL_RELEASE_AFTER`).
pub const MIN_HOST_CLAIM_RELEASE_AFTER: Duration = Duration::from_secs(120);

/// `--host-claim-release-after`: a duration of at least [`MIN_HOST_CLAIM_RELEASE_AFTER`].
fn parse_claim_release_after(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_HOST_CLAIM_RELEASE_AFTER {
        return Err(format!(
            "{s} is shorter than {}s: a claim could be released before the object it was made for is stored",
            MIN_HOST_CLAIM_RELEASE_AFTER.as_secs()
        ));
    }
    Ok(d)
}

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
    Serve(Box<ServeArgs>),
    /// Read one AdmissionReview and print the response the server would give (no side effects).
    Review(ReviewArgs),
    /// Inject the sidecar into the pod templates of YAML manifests that ask for it.
    Inject(InjectArgs),
    /// Before sidecert is uninstalled (the chart's pre-delete hook): stop admission and the
    /// reconciler, then remove sidecert's HTTP-01 paths, solver Services, Roles and
    /// RoleBindings in every namespace, and its host claims. Secrets stay.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Kubeconfig file (default: in-cluster, then `$KUBECONFIG`).
    #[arg(long, env = "SIDECERT_WEBHOOK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// sidecert's namespace (its host claims live there; it is never cleaned itself). Default:
    /// the Pod's own.
    #[arg(long, env = "SIDECERT_WEBHOOK_NAMESPACE")]
    pub namespace: Option<String>,
    /// The MutatingWebhookConfiguration to delete first, so that nothing is admitted again
    /// (no default: a wrong one would leave admission on with the webhook stopped).
    #[arg(long, env = "SIDECERT_WEBHOOK_CONFIGURATION_NAME")]
    pub webhook_configuration_name: String,
    /// The webhook's Deployment in that namespace: scaled to zero, and its Pods waited for,
    /// so that no reconciler adds a path back (no default).
    #[arg(long, env = "SIDECERT_WEBHOOK_DEPLOYMENT")]
    pub deployment: String,
    /// How long to wait for the webhook's Pods to go.
    #[arg(long, env = "SIDECERT_WEBHOOK_CLEANUP_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The namespaces sidecert serves (as `serve --reconcile-namespace-selector`): cleaned,
    /// with those holding its host claims; no other namespace is touched.
    #[arg(
        long,
        env = "SIDECERT_WEBHOOK_RECONCILE_NAMESPACE_SELECTOR",
        default_value = defaults::RECONCILE_NAMESPACE_SELECTOR
    )]
    pub namespace_selector: String,
}

/// `serve` needs a serving certificate: either files (`--tls-cert-file` and `--tls-key-file`)
/// or `--self-signed`, never both.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("serving_certificate").required(true).args(["tls_cert_file", "self_signed"])))]
pub struct ServeArgs {
    /// HTTPS address for /mutate, /healthz and /readyz.
    #[arg(long, env = "SIDECERT_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address for /metrics.
    #[arg(long, env = "SIDECERT_WEBHOOK_METRICS_LISTEN", default_value = "0.0.0.0:9443")]
    pub metrics_listen: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when it changes. Needs `--tls-key-file`;
    /// excludes `--self-signed`.
    #[arg(
        long,
        env = "SIDECERT_WEBHOOK_TLS_CERT_FILE",
        requires = "tls_key_file",
        conflicts_with = "self_signed"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// Serving private key (PEM); reloaded when it changes.
    #[arg(
        long,
        env = "SIDECERT_WEBHOOK_TLS_KEY_FILE",
        requires = "tls_cert_file",
        conflicts_with = "self_signed"
    )]
    pub tls_key_file: Option<PathBuf>,
    /// CA bundle (PEM) of the client certificate the API server presents to this webhook
    /// (the API server's `--admission-control-config-file`, WebhookAdmission kubeconfig).
    /// When set, `/mutate` answers 401 to any caller without a certificate issued by it, so
    /// a review can come only from the API server; `/healthz` and `/readyz` stay open for
    /// the kubelet's probes. Use a CA that issues nothing but that client certificate.
    /// Read at start.
    #[arg(long, env = "SIDECERT_WEBHOOK_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "SIDECERT_WEBHOOK_TLS_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// HTTP worker threads (default: one per CPU).
    #[arg(long, env = "SIDECERT_WEBHOOK_WORKERS")]
    pub workers: Option<usize>,
    /// Time budget for the API calls of one review: the live check of a Pod the caches do not
    /// select, then the side effects (the API server's webhook timeout is 10 s).
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDE_EFFECT_TIMEOUT", default_value = "4s", value_parser = parse_duration)]
    pub side_effect_timeout: Duration,
    /// After SIGTERM: how long the server keeps serving with /readyz false (and every response
    /// closing its connection) before it stops listening, so the endpoints drop the Pod first.
    #[arg(long, env = "SIDECERT_WEBHOOK_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// How long in-flight reviews may take to finish after SIGTERM.
    #[arg(long, env = "SIDECERT_WEBHOOK_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Kubeconfig file (default: in-cluster config, then $KUBECONFIG).
    #[arg(long, env = "SIDECERT_WEBHOOK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub self_signed: SelfSignedArgs,
    #[command(flatten)]
    pub reconciler: ReconcilerArgs,
    #[command(flatten)]
    pub mutation: MutationArgs,
}

/// What one client may hold of the HTTPS server, so that a Pod that can reach port 8443 can
/// neither exhaust the webhook's memory (chart limit 256Mi) nor crowd out the API server's
/// own reviews. "Address" is the connection's source IP (an IPv4-mapped IPv6 address counts
/// as its IPv4 address): in a cluster, each API server and each Pod has its own.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct LimitArgs {
    /// How long a client may take for each step of a request: the TLS handshake, the request
    /// head (the first of a connection; actix times no later one, whose size is bounded), and
    /// then the body (including any wait for a review slot). Keep it below the
    /// webhook configuration's `timeoutSeconds` (chart default 10 s) minus
    /// `--side-effect-timeout`: the API server sends a review at once, so only a client that
    /// trickles its request is cut off (408 and the connection closed).
    #[arg(long, env = "SIDECERT_WEBHOOK_REQUEST_READ_TIMEOUT", default_value = defaults::REQUEST_READ_TIMEOUT, value_parser = parse_duration)]
    pub request_read_timeout: Duration,
    /// Open HTTPS connections, in total. A connection over the limit is closed as soon as it
    /// is accepted, before the TLS handshake. An idle one costs a few KiB; at worst (a client
    /// that sends but is not read: up to 128 KiB of unparsed request in actix, plus the TLS
    /// and payload buffers) some 200 KiB, so 512 stay near 100 MiB. With the review slots'
    /// 96 MiB that is the webhook's worst case, within the chart's 256Mi limit.
    #[arg(long, env = "SIDECERT_WEBHOOK_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Open HTTPS connections from one source address (at most `--max-connections`). The API
    /// server opens one connection per review in flight (the webhook speaks HTTP/1.1 only).
    #[arg(long, env = "SIDECERT_WEBHOOK_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = defaults::MAX_CONNECTIONS_PER_ADDRESS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_address: u32,
    /// Reviews in flight, in total: a review holds its slot from before its body is read
    /// until it is answered, and may buffer up to 3 MiB of body, so 32 slots bound the
    /// bodies to 96 MiB. A review that finds no slot waits for one (first come, first
    /// served) within `--request-read-timeout`, then gets 503.
    #[arg(long, env = "SIDECERT_WEBHOOK_MAX_CONCURRENT_REVIEWS", default_value_t = defaults::MAX_CONCURRENT_REVIEWS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_reviews: u32,
    /// Reviews in flight from one source address (at most `--max-concurrent-reviews`); over
    /// it, a review waits within `--request-read-timeout`, then gets 429. A review takes well
    /// under a millisecond unless it makes API calls, so 16 carry the API server's bursts,
    /// while one client alone can hold at most half of the slots.
    #[arg(long, env = "SIDECERT_WEBHOOK_MAX_CONCURRENT_REVIEWS_PER_ADDRESS", default_value_t = defaults::MAX_CONCURRENT_REVIEWS_PER_ADDRESS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_reviews_per_address: u32,
    /// Source addresses kept apart from the totals (comma-separated CIDRs or addresses, e.g.
    /// the API server's): their connections and reviews never count against
    /// `--max-connections` or `--max-concurrent-reviews`; together they get a pool of their
    /// own, of `--max-connections-per-address` connections and
    /// `--max-concurrent-reviews-per-address` reviews, so however many other clients fill
    /// the totals, the API server still gets in. That pool adds up to some 75 MiB to the
    /// webhook's worst case (25 MiB of connections, 48 MiB of bodies), whatever the list's
    /// size: give the webhook 320Mi when you set it. A CIDR with host bits set, or one of
    /// every address, is refused. Empty: none.
    #[arg(long, env = "SIDECERT_WEBHOOK_RESERVED_SOURCES", default_value = "", value_parser = Reserved::parse)]
    pub reserved_sources: Reserved,
}

impl Default for LimitArgs {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            request_read_timeout: default_duration(defaults::REQUEST_READ_TIMEOUT),
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_address: defaults::MAX_CONNECTIONS_PER_ADDRESS,
            max_concurrent_reviews: defaults::MAX_CONCURRENT_REVIEWS,
            max_concurrent_reviews_per_address: defaults::MAX_CONCURRENT_REVIEWS_PER_ADDRESS,
            reserved_sources: Reserved::default(),
        }
    }
}

/// Where the serving certificate comes from, once the flags are checked.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files, reloaded when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// A CA in a Secret and a serving certificate issued in memory ([`crate::tls`]).
    SelfSigned(SelfSignedArgs),
}

impl ServeArgs {
    /// Checks that exactly one source of the serving certificate is given (clap checks the
    /// command line; this also covers `ServeArgs` built in code).
    pub fn tls_source(&self) -> Result<TlsSource, String> {
        match (&self.tls_cert_file, &self.tls_key_file, self.self_signed.enabled) {
            (Some(_), _, true) | (_, Some(_), true) => Err(
                "--self-signed and --tls-cert-file/--tls-key-file exclude each other; give one".to_owned(),
            ),
            (Some(cert), Some(key), false) => Ok(TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None, true) => Ok(TlsSource::SelfSigned(self.self_signed.clone())),
            (Some(_), None, false) => Err("--tls-cert-file needs --tls-key-file".to_owned()),
            (None, Some(_), false) => Err("--tls-key-file needs --tls-cert-file".to_owned()),
            (None, None, false) => Err(
                "no serving certificate: give --self-signed, or --tls-cert-file and --tls-key-file"
                    .to_owned(),
            ),
        }
    }
}

/// Default name of the Lease the replicas elect the reconciler's leader on.
pub const DEFAULT_LEADER_LEASE_NAME: &str = defaults::LEADER_LEASE_NAME;

/// The Ingress reconciler, run by one leader among the replicas (a Lease in the release
/// namespace, which is `--namespace` or the Pod's own).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ReconcilerArgs {
    /// Run the Ingress reconciler (on the elected leader). `--reconcile=false`: admission only.
    #[arg(id = "reconcile", long = "reconcile", env = "SIDECERT_WEBHOOK_RECONCILE", default_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub enabled: bool,
    /// Restart (once, like `kubectl rollout restart`) the workloads whose Pods back an annotated
    /// Ingress without the sidecar. `false`: only an Event says they need it.
    #[arg(long, env = "SIDECERT_WEBHOOK_ROLLOUT_RESTART", default_value_t = defaults::ROLLOUT_RESTART,
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub rollout_restart: bool,
    /// Lease (in the release namespace) on which the replicas elect the reconciler's leader.
    #[arg(long, env = "SIDECERT_WEBHOOK_LEADER_LEASE_NAME", default_value = DEFAULT_LEADER_LEASE_NAME)]
    pub leader_lease_name: String,
    /// How long a leader's Lease lasts without renewal (a killed leader is replaced after this).
    #[arg(long, env = "SIDECERT_WEBHOOK_LEADER_LEASE_DURATION", default_value = defaults::LEADER_LEASE_DURATION, value_parser = parse_duration)]
    pub leader_lease_duration: Duration,
    /// Identity on the Lease (default: `POD_NAME` or the host name, plus a random suffix).
    #[arg(long, env = "SIDECERT_WEBHOOK_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,
    /// Label selector of the namespaces sidecert serves, in admission and in the reconciler
    /// (keep it in step with the MutatingWebhookConfiguration's namespaceSelector): a review
    /// for any other namespace changes nothing, whatever it says. kube-system, kube-public,
    /// kube-node-lease and the release namespace are never served.
    #[arg(
        long,
        env = "SIDECERT_WEBHOOK_RECONCILE_NAMESPACE_SELECTOR",
        default_value = defaults::RECONCILE_NAMESPACE_SELECTOR
    )]
    pub reconcile_namespace_selector: String,
    /// How often every annotated Ingress is looked at again, changed or not.
    #[arg(long, env = "SIDECERT_WEBHOOK_RECONCILE_INTERVAL", default_value = defaults::RECONCILE_INTERVAL, value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// How long a host's claim outlives the last object of its namespace that asks for the
    /// host (annotated Ingress, or Pod with a certificate for it); then another namespace
    /// may claim it. At least 2m: shorter, a claim could go before the object it was made
    /// for is stored.
    #[arg(long, env = "SIDECERT_WEBHOOK_HOST_CLAIM_RELEASE_AFTER", default_value = defaults::HOST_CLAIM_RELEASE_AFTER, value_parser = parse_claim_release_after)]
    pub host_claim_release_after: Duration,
}

impl Default for ReconcilerArgs {
    /// The flags' defaults, with the reconciler off (code that builds `ServeArgs` opts in).
    fn default() -> Self {
        Self {
            enabled: false,
            rollout_restart: defaults::ROLLOUT_RESTART,
            leader_lease_name: DEFAULT_LEADER_LEASE_NAME.to_owned(),
            leader_lease_duration: default_duration(defaults::LEADER_LEASE_DURATION),
            leader_identity: None,
            reconcile_namespace_selector: defaults::RECONCILE_NAMESPACE_SELECTOR.to_owned(),
            reconcile_interval: default_duration(defaults::RECONCILE_INTERVAL),
            host_claim_release_after: default_duration(defaults::HOST_CLAIM_RELEASE_AFTER),
        }
    }
}

/// Default name of the Secret that holds the webhook's CA.
pub const DEFAULT_CA_SECRET_NAME: &str = defaults::CA_SECRET_NAME;
/// Default name of the webhook's Service.
pub const DEFAULT_SERVICE_NAME: &str = defaults::SERVICE_NAME;
/// Default name of the MutatingWebhookConfiguration whose `caBundle` the webhook keeps current.
pub const DEFAULT_WEBHOOK_CONFIGURATION_NAME: &str = defaults::WEBHOOK_CONFIGURATION_NAME;

/// `serve --self-signed`: the webhook keeps its own CA in a Secret, issues its serving
/// certificate in memory and patches the `caBundle` of its MutatingWebhookConfiguration.
/// Durations take `ms`, `s`, `m`, `h` or `d` (`90d`, `2h`, `40s`).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct SelfSignedArgs {
    /// Manage the serving certificate: CA in a Secret, serving certificate in memory, rotation.
    #[arg(id = "self_signed", long = "self-signed", env = "SIDECERT_WEBHOOK_SELF_SIGNED",
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub enabled: bool,
    /// Namespace of the CA Secret and the Service (default: the Pod's own namespace, from the
    /// service-account namespace file or `POD_NAMESPACE`).
    #[arg(long, env = "SIDECERT_WEBHOOK_NAMESPACE")]
    pub namespace: Option<String>,
    /// The webhook's Service; its DNS names go into the serving certificate.
    #[arg(long, env = "SIDECERT_WEBHOOK_SERVICE_NAME", default_value = DEFAULT_SERVICE_NAME)]
    pub service_name: String,
    /// Secret holding the CA (`ca.crt`, `ca.key`; `next-ca.crt`, `next-ca.key` during a rollover).
    #[arg(long, env = "SIDECERT_WEBHOOK_CA_SECRET_NAME", default_value = DEFAULT_CA_SECRET_NAME)]
    pub ca_secret_name: String,
    /// MutatingWebhookConfiguration whose webhooks get the CA bundle.
    #[arg(long, env = "SIDECERT_WEBHOOK_CONFIGURATION_NAME", default_value = DEFAULT_WEBHOOK_CONFIGURATION_NAME)]
    pub webhook_configuration_name: String,
    /// Lifetime of a new CA.
    #[arg(long, env = "SIDECERT_WEBHOOK_CA_VALIDITY", default_value = defaults::CA_VALIDITY, value_parser = parse_duration)]
    pub ca_validity: Duration,
    /// Start a CA rollover when the CA has less than this left.
    #[arg(long, env = "SIDECERT_WEBHOOK_CA_ROTATE_BEFORE", default_value = defaults::CA_ROTATE_BEFORE, value_parser = parse_duration)]
    pub ca_rotate_before: Duration,
    /// Lifetime of a serving certificate.
    #[arg(long, env = "SIDECERT_WEBHOOK_SERVING_VALIDITY", default_value = defaults::SERVING_VALIDITY, value_parser = parse_duration)]
    pub serving_validity: Duration,
    /// Issue a new serving certificate when the current one has less than this left.
    #[arg(long, env = "SIDECERT_WEBHOOK_SERVING_ROTATE_BEFORE", default_value = defaults::SERVING_ROTATE_BEFORE, value_parser = parse_duration)]
    pub serving_rotate_before: Duration,
    /// During a CA rollover, how long the new CA stands in the `caBundle` before the serving
    /// certificate switches to it (time for every API server to pick the bundle up).
    #[arg(long, env = "SIDECERT_WEBHOOK_CA_ROLLOVER_DELAY", default_value = defaults::CA_ROLLOVER_DELAY, value_parser = parse_duration)]
    pub ca_rollover_delay: Duration,
    /// More DNS names for the serving certificate (comma-separated).
    #[arg(long, env = "SIDECERT_WEBHOOK_EXTRA_DNS_NAMES", value_delimiter = ',')]
    pub extra_dns_names: Vec<String>,
    /// IP addresses for the serving certificate (comma-separated; for `url` client configs).
    #[arg(long, env = "SIDECERT_WEBHOOK_EXTRA_IP_SANS", value_delimiter = ',')]
    pub extra_ip_sans: Vec<IpAddr>,
}

impl Default for SelfSignedArgs {
    /// The flags' defaults, with `enabled` false.
    fn default() -> Self {
        Self {
            enabled: false,
            namespace: None,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            ca_secret_name: DEFAULT_CA_SECRET_NAME.to_owned(),
            webhook_configuration_name: DEFAULT_WEBHOOK_CONFIGURATION_NAME.to_owned(),
            ca_validity: default_duration(defaults::CA_VALIDITY),
            ca_rotate_before: default_duration(defaults::CA_ROTATE_BEFORE),
            serving_validity: default_duration(defaults::SERVING_VALIDITY),
            serving_rotate_before: default_duration(defaults::SERVING_ROTATE_BEFORE),
            ca_rollover_delay: default_duration(defaults::CA_ROLLOVER_DELAY),
            extra_dns_names: Vec::new(),
            extra_ip_sans: Vec::new(),
        }
    }
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
        default_value = defaults::SIDECAR_IMAGE
    )]
    pub sidecar_image: String,
    /// Sidecar image pull policy.
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_IMAGE_PULL_POLICY", default_value = defaults::SIDECAR_IMAGE_PULL_POLICY,
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: String,
    /// Sidecar CPU request.
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_CPU_REQUEST", default_value = defaults::SIDECAR_CPU_REQUEST)]
    pub sidecar_cpu_request: String,
    /// Sidecar memory request.
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_MEMORY_REQUEST", default_value = defaults::SIDECAR_MEMORY_REQUEST)]
    pub sidecar_memory_request: String,
    /// Sidecar CPU limit (empty: none).
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_CPU_LIMIT", default_value = defaults::SIDECAR_CPU_LIMIT)]
    pub sidecar_cpu_limit: String,
    /// Sidecar memory limit (empty: none).
    #[arg(long, env = "SIDECERT_WEBHOOK_SIDECAR_MEMORY_LIMIT", default_value = defaults::SIDECAR_MEMORY_LIMIT)]
    pub sidecar_memory_limit: String,
    /// Default ACME server: letsencrypt, letsencrypt-staging or a directory URL.
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_SERVER", default_value = defaults::ACME_SERVER)]
    pub acme_server: String,
    /// More ACME servers an Ingress or Pod may name in `sidecert.io/acme-server`, comma
    /// separated (letsencrypt, letsencrypt-staging or directory URLs). Always allowed: Let's
    /// Encrypt's production and staging directories and --acme-server. Any other gets a
    /// warning and no certificate, so a tenant cannot point sidecars at a CA of its choice.
    #[arg(long, env = "SIDECERT_WEBHOOK_ALLOWED_ACME_SERVERS", value_delimiter = ',')]
    pub allowed_acme_servers: Vec<String>,
    /// The domains any namespace may claim, comma separated: `shop.example.com` itself,
    /// `*.example.com` one label under it (not deeper). Unset: any domain. A Namespace's
    /// `sidecert.io/allowed-domains` narrows it, never widens it.
    #[arg(long, env = "SIDECERT_WEBHOOK_ALLOWED_DOMAINS")]
    pub allowed_domains: Option<String>,
    /// Default ACME account email.
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// Default ACME profile.
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_PROFILE")]
    pub acme_profile: Option<String>,
    /// Default key algorithm: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096.
    #[arg(long, env = "SIDECERT_WEBHOOK_KEY_ALGORITHM", default_value_t = KeyAlgorithm::default())]
    pub key_algorithm: KeyAlgorithm,
    /// Secret (in the Pod's namespace) with keyId and hmacKey for external account binding.
    #[arg(long, env = "SIDECERT_WEBHOOK_EAB_SECRET")]
    pub eab_secret: Option<String>,
    /// PEM bundle the sidecar trusts for the ACME server's HTTPS (private CAs, Pebble).
    #[arg(long, env = "SIDECERT_WEBHOOK_ACME_CA_BUNDLE_FILE")]
    pub acme_ca_bundle_file: Option<PathBuf>,
}

impl Default for MutationArgs {
    /// The flags' defaults, for tests and library users.
    fn default() -> Self {
        Self {
            sidecar_image: defaults::SIDECAR_IMAGE.to_owned(),
            sidecar_image_pull_policy: defaults::SIDECAR_IMAGE_PULL_POLICY.to_owned(),
            sidecar_cpu_request: defaults::SIDECAR_CPU_REQUEST.to_owned(),
            sidecar_memory_request: defaults::SIDECAR_MEMORY_REQUEST.to_owned(),
            sidecar_cpu_limit: defaults::SIDECAR_CPU_LIMIT.to_owned(),
            sidecar_memory_limit: defaults::SIDECAR_MEMORY_LIMIT.to_owned(),
            acme_server: defaults::ACME_SERVER.to_owned(),
            allowed_acme_servers: Vec::new(),
            allowed_domains: None,
            acme_email: None,
            acme_profile: None,
            key_algorithm: KeyAlgorithm::default(),
            eab_secret: None,
            acme_ca_bundle_file: None,
        }
    }
}

/// Sets up logging on stderr (stdout carries the offline commands' output).
pub fn init_tracing(format: &LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["sidecert-webhook", "serve"].iter().chain(args))?;
        match cli.command {
            Command::Serve(args) => Ok(*args),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_host_claim_lasts_at_least_two_minutes() {
        for short in ["0s", "90s", "1m"] {
            let e = serve(&["--self-signed", "--host-claim-release-after", short]).unwrap_err();
            assert!(e.to_string().contains("shorter than 120s"), "{short}: {e}");
        }
        let args = serve(&["--self-signed", "--host-claim-release-after", "2m"]).unwrap();
        assert_eq!(args.reconciler.host_claim_release_after, Duration::from_secs(120));
    }

    #[test]
    fn durations_take_hours_and_days() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("40").unwrap(), Duration::from_secs(40));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn mutation_flags_default_like_code() {
        let cli = Cli::try_parse_from(["sidecert-webhook", "inject", "-f", "x.yaml"]).unwrap();
        let Command::Inject(args) = cli.command else {
            unreachable!()
        };
        let d = MutationArgs::default();
        assert_eq!(args.mutation.sidecar_image, d.sidecar_image);
        assert_eq!(
            args.mutation.sidecar_image_pull_policy,
            d.sidecar_image_pull_policy
        );
        assert_eq!(args.mutation.sidecar_cpu_request, d.sidecar_cpu_request);
        assert_eq!(args.mutation.sidecar_memory_request, d.sidecar_memory_request);
        assert_eq!(args.mutation.sidecar_cpu_limit, d.sidecar_cpu_limit);
        assert_eq!(args.mutation.sidecar_memory_limit, d.sidecar_memory_limit);
        assert_eq!(args.mutation.acme_server, d.acme_server);
        assert_eq!(args.mutation.key_algorithm, d.key_algorithm);
        assert_eq!(
            defaults::RECONCILE_NAMESPACE_SELECTOR,
            format!(
                "{}={}",
                sidecert_contract::INJECTION_LABEL,
                sidecert_contract::INJECTION_ENABLED
            )
        );
    }

    #[test]
    fn self_signed_flags_and_defaults() {
        let args = serve(&["--self-signed"]).unwrap();
        assert_eq!(
            args.self_signed,
            SelfSignedArgs {
                enabled: true,
                ..SelfSignedArgs::default()
            }
        );
        assert!(matches!(args.tls_source(), Ok(TlsSource::SelfSigned(_))));

        let args = serve(&[
            "--self-signed",
            "--namespace=ops",
            "--serving-validity=40s",
            "--extra-ip-sans=10.213.0.1,::1",
            "--extra-dns-names=a.example,b.example",
        ])
        .unwrap();
        let ss = args.self_signed;
        assert_eq!(ss.namespace.as_deref(), Some("ops"));
        assert_eq!(ss.serving_validity, Duration::from_secs(40));
        assert_eq!(ss.extra_ip_sans.len(), 2);
        assert_eq!(ss.extra_dns_names, ["a.example", "b.example"]);
    }

    #[test]
    fn reconciler_flags_and_defaults() {
        let args = serve(&["--self-signed"]).unwrap();
        assert_eq!(
            args.reconciler,
            ReconcilerArgs {
                enabled: true,
                ..ReconcilerArgs::default()
            }
        );
        assert_eq!(args.shutdown_delay, Duration::from_secs(5));
        let args = serve(&[
            "--self-signed",
            "--reconcile=false",
            "--rollout-restart",
            "false",
            "--leader-lease-name=x-leader",
            "--shutdown-delay=0s",
        ])
        .unwrap();
        assert!(!args.reconciler.enabled);
        assert!(!args.reconciler.rollout_restart);
        assert_eq!(args.reconciler.leader_lease_name, "x-leader");
        assert_eq!(args.shutdown_delay, Duration::ZERO);
        assert!(
            serve(&["--self-signed", "--reconcile"])
                .unwrap()
                .reconciler
                .enabled
        );
    }

    #[test]
    fn limit_flags_and_defaults() {
        let args = serve(&["--self-signed"]).unwrap();
        assert_eq!(args.limits, LimitArgs::default());
        assert_eq!(args.limits.request_read_timeout, Duration::from_secs(5));
        let args = serve(&[
            "--self-signed",
            "--request-read-timeout=2s",
            "--max-connections=10",
            "--max-connections-per-address=3",
            "--max-concurrent-reviews=4",
            "--max-concurrent-reviews-per-address=2",
            "--reserved-sources=10.0.0.0/24,192.0.2.7",
        ])
        .unwrap();
        assert_eq!(
            args.limits,
            LimitArgs {
                request_read_timeout: Duration::from_secs(2),
                max_connections: 10,
                max_connections_per_address: 3,
                max_concurrent_reviews: 4,
                max_concurrent_reviews_per_address: 2,
                reserved_sources: Reserved::parse("10.0.0.0/24,192.0.2.7/32").unwrap(),
            }
        );
        assert!(serve(&["--self-signed", "--max-connections=0"]).is_err());
        assert!(serve(&["--self-signed", "--reserved-sources=10.0.0.0/40"]).is_err());
        assert!(serve(&["--self-signed", "--request-read-timeout=soon"]).is_err());
    }

    #[test]
    fn exactly_one_certificate_source() {
        let files = serve(&["--tls-cert-file=c", "--tls-key-file=k"]).unwrap();
        assert!(matches!(files.tls_source(), Ok(TlsSource::Files { .. })));
        assert!(serve(&[]).is_err());
        assert!(serve(&["--tls-cert-file=c"]).is_err());
        assert!(serve(&["--self-signed", "--tls-cert-file=c", "--tls-key-file=k"]).is_err());

        // Built in code, not parsed: the same rules, with a clear message.
        let mut args = files;
        args.self_signed.enabled = true;
        assert!(args.tls_source().unwrap_err().contains("exclude each other"));
        args.tls_cert_file = None;
        args.tls_key_file = None;
        args.self_signed.enabled = false;
        assert!(args.tls_source().unwrap_err().contains("--self-signed"));
    }
}
