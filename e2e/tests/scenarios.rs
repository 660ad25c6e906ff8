//! The end-to-end scenarios of issue 5, on the local plane with the chart installed by
//! `helm upgrade --install`: the webhook runs from its image as the Deployment's Pods on the
//! plane's real node, the API server calls it through its Service, the injected sidecars run
//! from theirs and order from Pebble.
//!
//! One test installs one release and runs the scenarios against it, in order; scenario 2
//! (renewal of a 120-second certificate, the slow one) runs beside the others. Each scenario
//! works in namespaces of its own and deletes them; a failing one prints its objects, Events
//! and container logs and the webhook's logs, and the others still run. The release is
//! uninstalled at the end, also when the test panics.
//!
//! `SIDECERT_E2E_SCENARIOS=1,3` runs a subset (by number).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    batch::v1::Job,
    core::v1::{Container, Pod, Secret, Service},
    networking::v1::Ingress,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};
use sidecert_contract::{ACME_CHALLENGE_PATH, SIDECAR_CONTAINER_NAME, SOLVER_SERVICE_SUFFIX, annotations};
use sidecert_e2e::{Plane, TestNamespace, create_until, ingress, wait_for};
use tokio::io::AsyncWriteExt;

/// Release name: its cluster-scoped objects (MutatingWebhookConfiguration `sidecert-e2e`,
/// ClusterRole `sidecert-e2e-webhook`) never collide with `make demo`'s release `sidecert`.
const RELEASE: &str = "sidecert-e2e";
const CHART: &str = "charts/sidecert";
const HELM: &str = "e2e/.cache/bin/helm";
const APP_IMAGE: &str = "example/app:1.0";
/// What the app image serves at `/` (e2e/scripts/images.sh).
const APP_PAGE: &str = "sidecert test app";
/// What the app (busybox httpd) answers for a file it does not have, unlike Traefik's own
/// `404 page not found` when no router matches.
const APP_NOT_FOUND: &str = "<TITLE>404 Not Found</TITLE>";
/// What a sidecar's HTTP-01 responder answers for a token it does not hold.
const SOLVER_UNKNOWN_TOKEN: &str = "unknown token\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenarios() {
    let plane = Plane::get().await.expect("local plane");
    let selected = selected_scenarios();
    let ctx = Ctx::install(plane).await.expect("helm install of the chart");
    let guard = UninstallGuard(Some(ctx.clone()));

    let renewal = async {
        if selected.contains(&2) {
            vec![run(2, "renewal of a short-lived certificate", s2_renewal(ctx.clone())).await]
        } else {
            Vec::new()
        }
    };
    let sequence = async {
        let mut outcomes = Vec::new();
        if selected.contains(&1) {
            outcomes.push(
                run(
                    1,
                    "Deployment + Service + annotated Ingress",
                    s1_ingress(ctx.clone()),
                )
                .await,
            );
        }
        if selected.contains(&3) {
            outcomes.push(run(3, "Pod with direct annotations", s3_direct_pod(ctx.clone())).await);
        }
        if selected.contains(&4) {
            outcomes.push(run(4, "unlabelled namespace, inject=false", s4_untouched(ctx.clone())).await);
        }
        if selected.contains(&5) {
            outcomes.push(run(5, "server-side dry run", s5_dry_run(ctx.clone())).await);
        }
        if selected.contains(&8) {
            outcomes.push(run(8, "bad Ingresses get warnings", s8_warnings(ctx.clone())).await);
        }
        if selected.contains(&9) {
            outcomes.push(
                run(
                    9,
                    "the API server refuses the webhook's writes outside labelled namespaces",
                    s9_namespace_guard(ctx.clone()),
                )
                .await,
            );
        }
        if selected.contains(&10) {
            outcomes.push(
                run(
                    10,
                    "what only a real kubelet shows: sidecar order, mounted Secret, Pod Security, a Job",
                    s10_real_kubelet(ctx.clone()),
                )
                .await,
            );
        }
        if selected.contains(&6) {
            outcomes.push(run(6, "helm upgrade while Pods are created", s6_upgrade(ctx.clone())).await);
        }
        if selected.contains(&7) {
            outcomes.push(
                run(
                    7,
                    "webhook down: refused, then admitted",
                    s7_webhook_down(ctx.clone()),
                )
                .await,
            );
        }
        if selected.contains(&13) {
            outcomes.push(
                run(
                    13,
                    "Gateway API: a Gateway and a ListenerSet",
                    s13_gateway(ctx.clone()),
                )
                .await,
            );
        }
        if selected.contains(&12) {
            outcomes.push(
                run(
                    12,
                    "strict RBAC: rights only in the namespaces listed",
                    s12_strict_rbac(ctx.clone()),
                )
                .await,
            );
        }
        outcomes
    };
    let (mut outcomes, sequence) = tokio::join!(renewal, sequence);
    outcomes.extend(sequence);
    outcomes.sort_by_key(|(n, _)| *n);

    let mut guard = guard;
    if let Some(ctx) = guard.0.take() {
        if selected.contains(&11) {
            outcomes.push(run(11, "helm uninstall cleans up first", s11_uninstall(&ctx)).await);
        }
        ctx.uninstall().await.expect("helm uninstall");
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("scenario {n}: {e:#}")))
        .collect();
    eprintln!(
        "scenarios: {} passed, {} failed",
        outcomes.len() - failed.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed scenarios:\n{}", failed.join("\n"));
}

fn selected_scenarios() -> BTreeSet<u8> {
    match std::env::var("SIDECERT_E2E_SCENARIOS") {
        Ok(list) if !list.trim().is_empty() => {
            list.split(',').filter_map(|s| s.trim().parse().ok()).collect()
        }
        _ => (1..=13).collect(),
    }
}

/// Runs one scenario, timing it and reporting its outcome.
async fn run(n: u8, title: &str, scenario: impl Future<Output = Result<()>>) -> (u8, Result<()>) {
    eprintln!("=== scenario {n}: {title}");
    let started = Instant::now();
    let result = scenario.await;
    let took = started.elapsed().as_secs_f32();
    match &result {
        Ok(()) => eprintln!("--- scenario {n} passed in {took:.1}s"),
        Err(e) => eprintln!("--- scenario {n} FAILED after {took:.1}s: {e:#}"),
    }
    (n, result)
}

// ---- the release and the tools -------------------------------------------------------------

/// The installed release and what the scenarios share.
#[derive(Clone)]
struct Ctx {
    plane: &'static Plane,
    /// The release's namespace, fresh for this run.
    release_ns: String,
    client: Client,
}

impl Ctx {
    /// The namespace holding the claim of `host` in the release namespace, if any.
    async fn claim_holder(&self, host: &str) -> Result<Option<String>> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), &self.release_ns);
        Ok(leases
            .get_opt(&format!("sidecert-host-{host}"))
            .await?
            .and_then(|l| l.spec?.holder_identity))
    }

    async fn install(plane: &'static Plane) -> Result<Ctx> {
        let client = plane.client().await?;
        let ctx = Ctx {
            plane,
            release_ns: format!("{RELEASE}-{}", random_suffix()),
            client,
        };
        ctx.remove_stale_releases().await?;
        ctx.refuse_other_installs().await?;
        let ca_file = plane.pebble_ca_file().display().to_string();
        // Pebble's CA goes in the chart's ConfigMap, which the kubelet mounts, as on any cluster.
        let (ca_flag, ca_value) = ("--set-file", format!("acme.caBundle={ca_file}"));
        // The API server presents a client certificate of this CA to webhooks (cluster-up.sh):
        // with it, /mutate answers the API server and nothing else (scenario 9).
        let client_ca = format!("webhook.clientCA={}", plane.webhook_client_ca_file().display());
        let started = Instant::now();
        ctx.helm_ok(&[
            "upgrade",
            "--install",
            RELEASE,
            CHART,
            "-n",
            &ctx.release_ns,
            "--create-namespace",
            "--wait",
            "--timeout",
            "120s",
            "--set",
            &format!("acme.server={}", plane.pebble_directory()),
            ca_flag,
            &ca_value,
            "--set-file",
            &client_ca,
            // Pebble picks a random profile for orders that name none; scenario 2 asks for
            // `shortlived` on its Ingress.
            "--set",
            "acme.profile=default",
            "--set",
            "acme.email=e2e@sidecert.test",
            "--set",
            "webhook.timeoutSeconds=8",
            "--set",
            "webhook.terminationGracePeriodSeconds=35",
        ])
        .await?;
        eprintln!(
            "installed release {RELEASE} in namespace {} in {:.1}s",
            ctx.release_ns,
            started.elapsed().as_secs_f32()
        );
        Ok(ctx)
    }

    /// A release of an earlier run that died before uninstalling would keep a webhook
    /// configuration with `failurePolicy: Fail` and no webhook behind it.
    async fn remove_stale_releases(&self) -> Result<()> {
        let list = self
            // -a: also one stuck `uninstalling` (its pre-delete hook failed).
            .helm_ok(&[
                "list",
                "-A",
                "-a",
                "-o",
                "json",
                "--filter",
                &format!("^{RELEASE}$"),
            ])
            .await?;
        let releases: Vec<Value> = serde_json::from_str(&list).context("helm list output")?;
        for r in releases {
            let Some(ns) = r["namespace"].as_str() else {
                continue;
            };
            eprintln!("removing the stale release {RELEASE} in namespace {ns}");
            // Without the cleanup hook: its webhook may be gone, and what it made in test
            // namespaces goes with them.
            self.helm_ok(&[
                "uninstall",
                RELEASE,
                "-n",
                ns,
                "--no-hooks",
                "--wait",
                "--timeout",
                "60s",
            ])
            .await?;
            self.kubectl(&["delete", "namespace", ns, "--wait=false"], None)
                .await?;
        }
        Ok(())
    }

    /// Another sidecert (e.g. `make demo`'s release) would review the same labelled
    /// namespaces: the first webhook injects, ours then sees `sidecert.io/status` and leaves
    /// the Pod alone, so what the scenarios check would be the other install's doing.
    async fn refuse_other_installs(&self) -> Result<()> {
        let configs = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .list(&ListParams::default())
            .await?;
        let others: Vec<String> = configs
            .items
            .into_iter()
            .filter(|c| {
                c.webhooks
                    .iter()
                    .flatten()
                    .any(|w| w.name.ends_with(".sidecert.io"))
            })
            .filter_map(|c| c.metadata.name)
            .collect();
        ensure!(
            others.is_empty(),
            "another sidecert install acts on labelled namespaces (MutatingWebhookConfiguration {others:?}); \
             the scenarios need the cluster to themselves: `make demo-down`, or `helm uninstall` it"
        );
        Ok(())
    }

    /// `helm uninstall` (a second one, after scenario 11's, finds no release), then the
    /// release namespace goes.
    async fn uninstall(&self) -> Result<()> {
        let out = command(
            self.plane,
            self.plane.repo_root().join(HELM).to_str().context("helm path")?,
            &[
                "uninstall",
                RELEASE,
                "-n",
                &self.release_ns,
                "--wait",
                "--timeout",
                "120s",
            ],
            None,
        )
        .await?;
        ensure!(
            out.success || out.stderr.contains("not found"),
            "helm uninstall: {}",
            out.describe()
        );
        self.kubectl(&["delete", "namespace", &self.release_ns, "--wait=false"], None)
            .await?;
        Ok(())
    }

    fn webhook_deployment(&self) -> String {
        format!("{RELEASE}-webhook")
    }

    /// Waits until the webhook's Pods are two, running, and all pass `arg` (after a
    /// `helm upgrade`, the old ones have terminated).
    async fn rolled_to(&self, arg: &str) -> Result<()> {
        let webhook_pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.release_ns);
        wait_for(Duration::from_secs(90), || {
            let webhook_pods = webhook_pods.clone();
            async move {
                let pods = webhook_pods
                    .list(&ListParams::default().labels("app.kubernetes.io/component=webhook"))
                    .await
                    .ok()?
                    .items;
                let new = |p: &Pod| {
                    p.spec.as_ref().is_some_and(|s| {
                        s.containers
                            .iter()
                            .any(|c| c.args.iter().flatten().any(|a| a == arg))
                    })
                };
                (pods.len() == 2 && pods.iter().all(|p| new(p) && is_running(p))).then_some(())
            }
        })
        .await
        .with_context(|| format!("the old webhook Pods did not go away (want only Pods with {arg})"))
    }

    async fn helm_ok(&self, args: &[&str]) -> Result<String> {
        let helm = self.plane.repo_root().join(HELM);
        let out = command(self.plane, helm.to_str().context("helm path")?, args, None).await?;
        out.ok()
    }

    async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        command(self.plane, "kubectl", args, stdin).await
    }

    async fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let out = self.kubectl(args, stdin).await?;
        ensure!(out.success, "{}", out.describe());
        Ok(out)
    }

    /// Runs `body` in fresh namespaces (`(prefix, labelled)`); on failure prints their
    /// state and the webhook's logs; always deletes them.
    async fn in_namespaces<F, Fut>(&self, specs: &[(&str, bool)], body: F) -> Result<()>
    where
        F: FnOnce(Vec<Arc<TestNamespace>>) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut namespaces = Vec::new();
        for (prefix, labelled) in specs {
            namespaces.push(Arc::new(self.plane.namespace(prefix, *labelled).await?));
        }
        let result = body(namespaces.clone()).await;
        if result.is_err() {
            for ns in &namespaces {
                self.dump(ns.name()).await;
            }
            self.dump_webhook().await;
        }
        for ns in namespaces {
            if let Ok(ns) = Arc::try_unwrap(ns) {
                let _ = ns.cleanup().await;
            }
        }
        result
    }

    /// The namespace's objects, then its Pods, Events and container logs.
    async fn dump(&self, ns: &str) {
        for args in [
            vec![
                "-n",
                ns,
                "get",
                "all,ingresses,secrets,roles,rolebindings,leases",
                "-o",
                "wide",
            ],
            vec!["-n", ns, "get", "ingresses", "-o", "yaml"],
            vec![
                "-n",
                ns,
                "get",
                "secrets",
                "-o",
                "custom-columns=NAME:.metadata.name,TEMPORARY:.metadata.annotations.sidecert\\.io/temporary,\
                 NOT-AFTER:.metadata.annotations.sidecert\\.io/not-after,DOMAINS:.metadata.annotations.sidecert\\.io/domains",
            ],
        ] {
            match self.kubectl(&args, None).await {
                Ok(out) => eprintln!("$ kubectl {}\n{}{}", args.join(" "), out.stdout, out.stderr),
                Err(e) => eprintln!("$ kubectl {}: {e:#}", args.join(" ")),
            }
        }
        self.plane.dump_on_failure(ns).await;
    }

    /// The webhook's Pods, Events and the last lines of each webhook container's log.
    async fn dump_webhook(&self) {
        let ns = &self.release_ns;
        for args in [
            vec![
                "-n",
                ns.as_str(),
                "get",
                "deployments,pods,endpointslices",
                "-o",
                "wide",
            ],
            vec!["-n", ns.as_str(), "get", "events", "--sort-by=.lastTimestamp"],
        ] {
            if let Ok(out) = self.kubectl(&args, None).await {
                eprintln!("$ kubectl {}\n{}{}", args.join(" "), out.stdout, out.stderr);
            }
        }
        sidecert_e2e::print_container_logs(&self.client, ns, 60).await;
    }
}

/// Uninstalls the release if the test panics before it does.
struct UninstallGuard(Option<Ctx>);

impl Drop for UninstallGuard {
    fn drop(&mut self) {
        let Some(ctx) = self.0.take() else {
            return;
        };
        let kubeconfig = ctx.plane.kubeconfig();
        let _ = std::process::Command::new(ctx.plane.repo_root().join(HELM))
            // After a panic: gone quickly, without the cleanup hook (the test namespaces go
            // with what sidecert made in them).
            .args([
                "uninstall",
                RELEASE,
                "-n",
                &ctx.release_ns,
                "--no-hooks",
                "--wait",
                "--timeout",
                "60s",
            ])
            .env("KUBECONFIG", kubeconfig)
            .status();
        let _ = std::process::Command::new("kubectl")
            .args(["delete", "namespace", &ctx.release_ns, "--wait=false"])
            .env("KUBECONFIG", kubeconfig)
            .status();
    }
}

struct Output {
    command: String,
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn ok(self) -> Result<String> {
        ensure!(self.success, "{}", self.describe());
        Ok(self.stdout)
    }

    fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?}\nstdout: {}\nstderr: {}",
            self.command,
            self.code,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Runs a program with the plane's KUBECONFIG, in the repository root.
async fn command(plane: &Plane, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let name = PathBuf::from(program)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let line = format!("{name} {}", args.join(" "));
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("KUBECONFIG", plane.kubeconfig())
        .current_dir(plane.repo_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("stdin")?;
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .with_context(|| format!("`{line}` did not finish in 180 s"))??;
    Ok(Output {
        command: line,
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn random_suffix() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(6)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect()
}

// ---- objects -----------------------------------------------------------------------------------

/// examples/web.yaml's shape: Service, Ingress (annotated, TLS for `hosts`), Deployment, as
/// one List in that order (the webhook selects Pods through the Ingress, so it comes first).
fn web_app(
    app: &str,
    hosts: &[String],
    secret: &str,
    replicas: u32,
    ingress_annotations: Value,
    pod_annotations: Value,
) -> Value {
    let rules: Vec<Value> = hosts
        .iter()
        .map(|h| {
            json!({"host": h, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": app, "port": {"name": "http"}}}}]}})
        })
        .collect();
    let mut ingress_ann = json!({annotations::ISSUE_TEMPORARY_CERTIFICATE: "true"});
    if let (Some(base), Some(extra)) = (ingress_ann.as_object_mut(), ingress_annotations.as_object()) {
        base.extend(extra.clone());
    }
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
         "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
         "metadata": {"name": app, "annotations": ingress_ann},
         "spec": {"tls": [{"hosts": hosts, "secretName": secret}], "rules": rules}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app, "labels": {"app": app}},
         "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}},
                  "template": {"metadata": {"labels": {"app": app}, "annotations": pod_annotations},
                               "spec": {"containers": [{"name": "app", "image": APP_IMAGE,
                                        "ports": [{"name": "http", "containerPort": 8080}]}]}}}}
    ]})
}

/// A bare Pod running `example/app`.
fn app_pod(name: &str, labels: Value, pod_annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": labels, "annotations": pod_annotations},
           "spec": {"containers": [{"name": "app", "image": APP_IMAGE,
                    "ports": [{"name": "http", "containerPort": 8080}]}]}})
}

/// The annotations that ask for a certificate without an Ingress.
fn direct_annotations(domains: &str, secret: &str) -> Value {
    json!({annotations::INJECT: "true", annotations::DOMAINS: domains, annotations::SECRET_NAME: secret})
}

fn host(label: &str, ns: &TestNamespace) -> String {
    format!("{label}.{}.sidecert.test", ns.name())
}

/// The injected container (native sidecar or regular container).
fn sidecar(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == SIDECAR_CONTAINER_NAME)
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("?")
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
                .map(|c| c.restart_count)
                .sum()
        })
        .unwrap_or(0)
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && pod.metadata.deletion_timestamp.is_none()
}

/// Waits until `count` Pods with `selector` are Running, and returns them.
async fn running_pods(pods: &Api<Pod>, selector: &str, count: usize, timeout: Duration) -> Result<Vec<Pod>> {
    wait_for(timeout, || {
        let pods = pods.clone();
        let lp = ListParams::default().labels(selector);
        async move {
            let list = pods.list(&lp).await.ok()?.items;
            (list.len() == count && list.iter().all(is_running)).then_some(list)
        }
    })
    .await
    .with_context(|| format!("{count} Running Pods with {selector}"))
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn tls_crt(secret: &Secret) -> Option<String> {
    let data = secret.data.as_ref()?.get("tls.crt")?;
    String::from_utf8(data.0.clone()).ok()
}

/// A Secret that holds an issued (not temporary) certificate.
fn is_issued(secret: &Secret) -> bool {
    annotation(secret, annotations::TEMPORARY) != Some("true")
        && annotation(secret, annotations::NOT_AFTER).is_some()
        && tls_crt(secret).is_some()
}

async fn wait_issued(secrets: &Api<Secret>, name: &str, timeout: Duration) -> Result<Secret> {
    wait_for(timeout, || {
        let secrets = secrets.clone();
        let name = name.to_owned();
        async move { secrets.get_opt(&name).await.ok().flatten().filter(is_issued) }
    })
    .await
    .with_context(|| format!("Secret {name} holding an issued certificate"))
}

/// What the scenarios check of a certificate chain.
#[derive(Debug)]
struct CertInfo {
    serial: String,
    sans: BTreeSet<String>,
    not_before: i64,
    not_after: i64,
}

/// Parses `chain_pem` (leaf first) and, if `root_pem` is given, checks that every
/// certificate is signed by the next and the last by that root.
fn check_chain(chain_pem: &str, root_pem: Option<&str>) -> Result<CertInfo> {
    let pems: Vec<_> =
        x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let ders: Vec<Vec<u8>> = pems.into_iter().map(|p| p.contents).collect();
    check_der_chain(&ders, root_pem)
}

/// [`check_chain`] for a chain in DER (as a TLS server sends it).
fn check_der_chain(ders: &[Vec<u8>], root_pem: Option<&str>) -> Result<CertInfo> {
    let certs = ders
        .iter()
        .map(|d| x509_parser::parse_x509_certificate(d).map(|(_, c)| c))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = certs.first().context("empty tls.crt")?;
    let sans = leaf
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(root_pem) = root_pem {
        ensure!(
            certs.len() >= 2,
            "tls.crt holds {} certificate(s), want leaf + chain",
            certs.len()
        );
        for pair in certs.windows(2) {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .with_context(|| format!("{} is not signed by {}", pair[0].subject(), pair[1].subject()))?;
        }
        let (_, root) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes())?;
        let root = root.parse_x509()?;
        let top = certs.last().context("empty chain")?;
        top.verify_signature(Some(root.public_key()))
            .context("the chain does not end at Pebble's root (GET /roots/0)")?;
        ensure!(
            top.issuer() == root.subject(),
            "issuer of the chain's top is not Pebble's root"
        );
    }
    Ok(CertInfo {
        serial: leaf.raw_serial_as_string(),
        sans,
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
    })
}

/// Checks that `secret` holds a certificate chaining to Pebble's root for exactly `domains`.
async fn check_issued(plane: &Plane, secret: &Secret, domains: &[String]) -> Result<CertInfo> {
    let root = plane.pebble_root_pem().await?;
    let name = secret.metadata.name.as_deref().unwrap_or("?");
    let info = check_chain(&tls_crt(secret).context("no tls.crt")?, Some(&root))
        .with_context(|| format!("certificate in Secret {name}"))?;
    let want: BTreeSet<String> = domains.iter().cloned().collect();
    ensure!(
        info.sans == want,
        "Secret {name}: certificate for {:?}, want exactly {want:?}",
        info.sans
    );
    ensure!(
        secret.type_.as_deref() == Some("kubernetes.io/tls"),
        "Secret {name} has type {:?}",
        secret.type_
    );
    Ok(info)
}

/// The ingress controller's Pod (the plane runs one): its uid and restart count, so a
/// scenario can tell it was neither replaced nor restarted.
async fn traefik_pod(client: &Client) -> Result<(String, i32)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "sidecert-ingress");
    let list = pods.list(&ListParams::default().labels("app=traefik")).await?;
    let pod = list.items.first().context("no Traefik Pod in sidecert-ingress")?;
    Ok((pod.metadata.uid.clone().unwrap_or_default(), restarts(pod)))
}

/// Waits up to `timeout` until `GET https://{host}{path}` through the ingress controller
/// answers as `ok` says (`want` names it); on timeout, says what it answered last.
async fn wait_answer(
    plane: &Plane,
    host: &str,
    path: &str,
    timeout: Duration,
    want: &str,
    ok: impl Fn(&ingress::Response) -> bool,
) -> Result<()> {
    let last = std::sync::Mutex::new(String::from("no answer"));
    let answered = wait_for(timeout, || async {
        match through_ingress(plane, host, path).await {
            Ok(r) if ok(&r) => Some(()),
            Ok(r) => {
                let body: String = r.body.chars().take(200).collect();
                *last.lock().unwrap() = format!("{} {body:?}", r.status);
                None
            }
            Err(e) => {
                *last.lock().unwrap() = format!("{e:#}");
                None
            }
        }
    })
    .await;
    let last = last.lock().unwrap().clone();
    answered.with_context(|| format!("https://{host}{path} answered {last}, not {want}"))
}

/// `GET https://{host}{path}` through the ingress controller (SNI and Host `host`).
async fn through_ingress(plane: &Plane, host: &str, path: &str) -> Result<ingress::Response> {
    ingress::https_get(plane.ingress_https(), host, path)
        .await
        .with_context(|| {
            format!(
                "GET https://{host}{path} through the ingress controller at {}",
                plane.ingress_https()
            )
        })
}

/// What the ingress controller is to serve for a host: the certificate whose serial is
/// `serial` (any, if `None`; `root`: and it chains to that root) and, if `app`, the app's page
/// at `/`.
struct Expect<'a> {
    serial: Option<&'a str>,
    root: Option<&'a str>,
    app: bool,
}

impl<'a> Expect<'a> {
    /// The certificate whose serial is `serial`, whatever answers behind it.
    fn certificate(serial: &'a str) -> Self {
        Self {
            serial: Some(serial),
            root: None,
            app: false,
        }
    }

    /// The app's page, with any certificate.
    fn app() -> Self {
        Self {
            serial: None,
            root: None,
            app: true,
        }
    }

    /// The app, with the issued certificate chaining to Pebble's `root`.
    fn issued(serial: &'a str, root: &'a str) -> Self {
        Self {
            serial: Some(serial),
            root: Some(root),
            app: true,
        }
    }
}

/// Waits up to `timeout` until the ingress controller serves `host` as `want` says; returns
/// how long after `since` that was, and the serial it served.
async fn wait_served(
    plane: &Plane,
    host: &str,
    want: Expect<'_>,
    since: Instant,
    timeout: Duration,
) -> Result<(Duration, String)> {
    let Expect { serial, root, app } = want;
    let last = Arc::new(std::sync::Mutex::new(String::from("no answer yet")));
    let seen = wait_for(timeout, || {
        let last = last.clone();
        async move {
            let outcome = async {
                let r = through_ingress(plane, host, "/").await?;
                let info = check_der_chain(&r.chain, root)?;
                ensure!(
                    !app || (r.status == 200 && r.body.contains(APP_PAGE)),
                    "status {} body {:?}",
                    r.status,
                    r.body.chars().take(120).collect::<String>()
                );
                if let Some(serial) = serial {
                    ensure!(
                        info.serial == serial,
                        "served serial {}, want {serial}",
                        info.serial
                    );
                }
                ensure!(info.sans.contains(host), "served certificate for {:?}", info.sans);
                Ok((since.elapsed(), info.serial))
            }
            .await;
            match outcome {
                Ok(t) => Some(t),
                Err(e) => {
                    *last.lock().unwrap() = format!("{e:#}");
                    None
                }
            }
        }
    })
    .await;
    let last = last.lock().unwrap().clone();
    seen.with_context(|| {
        format!(
            "https://{host}/ through the ingress never served {}{}: last {last}",
            serial.map_or("a certificate".to_owned(), |s| format!("serial {s}")),
            if app { " with the app" } else { "" }
        )
    })
}

/// Sum of `metric` over the sidecars of `pods` (their metrics port on the Pod IP), for the
/// series whose labels contain `label` (e.g. `result="issued"`; empty: all).
async fn sidecar_metric_sum(pods: &[Pod], metric: &str, label: &str) -> Result<f64> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut sum = 0.0;
    for pod in pods {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .with_context(|| format!("Pod {} has no IP", pod_name(pod)))?;
        let url = format!("http://{ip}:{}/metrics", sidecert_contract::DEFAULT_METRICS_PORT);
        let text = http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("GET {url} (Pod {})", pod_name(pod)))?
            .text()
            .await?;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if name == metric && series.contains(label) {
                sum += value.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(sum)
}

/// The distinct HTTP-01 tokens Pebble tried to validate for `domain` (from its log): one per
/// authorization it validated, so one per order that reached validation.
fn pebble_tokens(plane: &Plane, domain: &str) -> BTreeSet<String> {
    let log =
        std::fs::read_to_string(plane.repo_root().join("e2e/.state/logs/pebble.log")).unwrap_or_default();
    let prefix = format!("http://{domain}:");
    log.lines()
        .filter_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
        .filter_map(|rest| {
            rest.split_once(ACME_CHALLENGE_PATH)
                .map(|(_, token)| token.trim().to_owned())
        })
        .collect()
}

/// Events in `ns` with `reason`.
async fn events_with_reason(client: &Client, ns: &str, reason: &str) -> Result<Vec<String>> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.message.unwrap_or_default())
        .collect())
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---- the scenarios -------------------------------------------------------------------------------

/// Scenario 1: Labelled namespace; Service + annotated Ingress + Deployment (3 replicas) in one
/// `kubectl apply -f`: the temporary Secret at once, the HTTP-01 route, the solver Service,
/// the sidecar in every Pod, one order at Pebble, then the issued certificate for exactly the
/// Ingress's TLS hosts, chaining to Pebble's root.
async fn s1_ingress(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(&[("e2e-s1", true)], |namespaces| async move {
            let ns = &namespaces[0];
            let hosts = vec![host("web", ns), host("www", ns)];
            let mut manifest = web_app("web", &hosts, "web-tls", 3, json!({}), json!({}));
            // The app's own paths beside sidecert's: web_app's `/` Prefix, and an Exact
            // `/metrics` to another Service of the same Pods (the sidecars' metrics port), so
            // what answers tells which route Traefik chose.
            manifest["items"][1]["spec"]["rules"][0]["http"]["paths"]
                .as_array_mut()
                .context("web_app's Ingress has no paths")?
                .push(json!({"path": "/metrics", "pathType": "Exact",
                             "backend": {"service": {"name": "web-metrics", "port": {"number": 80}}}}));
            manifest["items"]
                .as_array_mut()
                .context("web_app's List has no items")?
                .push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-metrics"},
                             "spec": {"selector": {"app": "web"},
                                      "ports": [{"port": 80, "targetPort": sidecert_contract::DEFAULT_METRICS_PORT}]}}));
            let traefik = traefik_pod(&ctx.client).await?;
            let applied = Instant::now();
            ctx.kubectl_ok(
                &["-n", ns.name(), "apply", "-f", "-"],
                Some(&manifest.to_string()),
            )
            .await?;

            // At once: created by the Ingress's admission, before any Pod runs.
            let secrets: Api<Secret> = ns.api();
            let temporary = secrets
                .get_opt("web-tls")
                .await?
                .context("no Secret web-tls right after `kubectl apply` returned")?;
            ensure!(
                annotation(&temporary, annotations::TEMPORARY) == Some("true"),
                "web-tls right after apply is not the temporary certificate: {:?}",
                temporary.metadata.annotations
            );
            let temp_info = check_chain(
                &tls_crt(&temporary).context("temporary Secret without tls.crt")?,
                None,
            )?;
            // The deployed webhook claimed the hosts for this namespace (its RBAC and the
            // namespace guard let it write claims in its own namespace).
            for h in &hosts {
                let holder = ctx.claim_holder(h).await?;
                ensure!(
                    holder.as_deref() == Some(ns.name()),
                    "the claim of {h} is held by {holder:?}, want {}",
                    ns.name()
                );
            }
            ensure!(
                temp_info.sans == hosts.iter().cloned().collect(),
                "temporary certificate for {:?}",
                temp_info.sans
            );

            let solver = format!("web{SOLVER_SERVICE_SUFFIX}");
            let ingress = ns.api::<Ingress>().get("web").await?;
            for rule in ingress
                .spec
                .as_ref()
                .and_then(|s| s.rules.as_ref())
                .into_iter()
                .flatten()
            {
                let routed = rule.http.iter().flat_map(|h| &h.paths).any(|p| {
                    p.path.as_deref() == Some(ACME_CHALLENGE_PATH)
                        && p.backend.service.as_ref().map(|s| s.name.as_str()) == Some(solver.as_str())
                });
                ensure!(routed, "rule {:?} has no HTTP-01 path to {solver}", rule.host);
            }
            let solver_svc = ns
                .api::<Service>()
                .get_opt(&solver)
                .await?
                .with_context(|| format!("no solver Service {solver}"))?;
            let selector = solver_svc.spec.and_then(|s| s.selector).unwrap_or_default();
            ensure!(
                selector == BTreeMap::from([("app".to_owned(), "web".to_owned())]),
                "solver Service selects {selector:?}, want the backend's app=web"
            );

            // What a user sees through Traefik: HTTPS at once, with the temporary certificate
            // (Traefik loads an Ingress's certificate before any Pod runs), then the app.
            let (temporary_after, _) = wait_served(
                ctx.plane,
                &hosts[0],
                Expect::certificate(&temp_info.serial),
                applied,
                Duration::from_secs(30),
            )
            .await?;
            eprintln!(
                "scenario 1: apply -> https://{}/ through the ingress with the temporary certificate: {:.1} s",
                hosts[0],
                temporary_after.as_secs_f64()
            );
            let pods_api: Api<Pod> = ns.api();
            let pods = running_pods(&pods_api, "app=web", 3, Duration::from_secs(60)).await?;
            for pod in &pods {
                ensure!(sidecar(pod).is_some(), "Pod {} has no sidecar", pod_name(pod));
            }
            let (app_after, serial) =
                wait_served(ctx.plane, &hosts[0], Expect::app(), applied, Duration::from_secs(60)).await?;
            eprintln!(
                "scenario 1: apply -> the app over HTTPS through the ingress: {:.1} s, with the {} certificate",
                app_after.as_secs_f64(),
                if serial == temp_info.serial { "temporary" } else { "issued" }
            );
            // The app's paths still reach the app; the challenge path reaches a sidecar (its
            // EndpointSlice may reach Traefik in a later batch than the app's).
            wait_answer(
                ctx.plane,
                &hosts[0],
                "/metrics",
                Duration::from_secs(15),
                "the sidecars' metrics (the Exact path's Service)",
                |r| r.status == 200 && r.body.contains("sidecert_orders_total"),
            )
            .await?;
            let probe = format!("{ACME_CHALLENGE_PATH}sidecert-e2e-probe");
            for h in &hosts {
                wait_answer(
                    ctx.plane,
                    h,
                    &probe,
                    Duration::from_secs(15),
                    "the solver's unknown token",
                    |r| r.status == 404 && r.body == SOLVER_UNKNOWN_TOKEN,
                )
                .await?;
                let plain = ingress::http_get(ctx.plane.ingress_http(), h, "/").await?;
                ensure!(
                    plain.status == 200 && plain.body.contains(APP_PAGE),
                    "http://{h}/ answered {} {:?}",
                    plain.status,
                    plain.body
                );
            }

            let issued = wait_issued(&secrets, "web-tls", Duration::from_secs(90)).await?;
            let info = check_issued(ctx.plane, &issued, &hosts).await?;
            eprintln!("scenario 1: issued serial {} for {:?}", info.serial, info.sans);
            // Then, with no restart of any Pod or of Traefik, the issued one.
            let root = ctx.plane.pebble_root_pem().await?;
            for h in &hosts {
                let (issued_after, _) = wait_served(
                    ctx.plane,
                    h,
                    Expect::issued(&info.serial, &root),
                    applied,
                    Duration::from_secs(30),
                )
                .await?;
                eprintln!(
                    "scenario 1: apply -> https://{h}/ through the ingress with the issued certificate: {:.1} s",
                    issued_after.as_secs_f64()
                );
            }
            let now = traefik_pod(&ctx.client).await?;
            ensure!(
                now == traefik,
                "Traefik's Pod was replaced or restarted (uid, restarts): {traefik:?} then {now:?}"
            );
            ensure!(
                info.not_after - info.not_before > 86_400,
                "certificate lives {}s: the chart's acme.profile=default did not reach the order",
                info.not_after - info.not_before
            );

            // One order: the sidecars' own count (every replica, none restarted, so none
            // lost its counters) and Pebble's log (one validated challenge per host).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pods = pods_api
                .list(&ListParams::default().labels("app=web"))
                .await?
                .items;
            for pod in &pods {
                ensure!(restarts(pod) == 0, "Pod {} restarted", pod_name(pod));
            }
            let orders = sidecar_metric_sum(&pods, "sidecert_orders_total", "").await?;
            let issued_orders =
                sidecar_metric_sum(&pods, "sidecert_orders_total", "result=\"issued\"").await?;
            ensure!(
                orders == 1.0 && issued_orders == 1.0,
                "the sidecars made {orders} orders ({issued_orders} issued), want exactly 1"
            );
            let tokens = pebble_tokens(ctx.plane, &hosts[0]);
            ensure!(
                tokens.len() == 1,
                "Pebble validated {} challenges for {}: {tokens:?}",
                tokens.len(),
                hosts[0]
            );
            let issued_events = events_with_reason(&ctx.client, ns.name(), "Issued").await?;
            ensure!(issued_events.len() == 1, "Issued Events: {issued_events:?}");

            unlabelled_namespace_is_cleaned(&ctx, ns, &hosts[0], &solver, &issued).await
        })
        .await
}

/// Scenario 1, continued: the namespace loses its label. The reconciler's leader takes
/// sidecert's HTTP-01 paths off, deletes the solver Service and the sidecars' Roles and
/// RoleBindings (the Pods' ServiceAccount keeps no right on the certificate), and leaves the
/// issued certificate's Secret as it was.
async fn unlabelled_namespace_is_cleaned(
    ctx: &Ctx,
    ns: &TestNamespace,
    host: &str,
    solver: &str,
    issued: &Secret,
) -> Result<()> {
    ctx.kubectl_ok(&["label", "namespace", ns.name(), "sidecert.io/injection-"], None)
        .await?;
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=sidecert");
    let (roles, bindings, services, ingresses) = (
        ns.api::<k8s_openapi::api::rbac::v1::Role>(),
        ns.api::<k8s_openapi::api::rbac::v1::RoleBinding>(),
        ns.api::<Service>(),
        ns.api::<Ingress>(),
    );
    let left = || async {
        let mut left = Vec::new();
        for r in roles.list_metadata(&managed).await.ok()?.items {
            left.push(format!("Role {}", r.metadata.name.unwrap_or_default()));
        }
        for b in bindings.list_metadata(&managed).await.ok()?.items {
            left.push(format!("RoleBinding {}", b.metadata.name.unwrap_or_default()));
        }
        if services.get_opt(solver).await.ok()?.is_some() {
            left.push(format!("Service {solver}"));
        }
        let ingress = ingresses.get("web").await.ok()?;
        let routed = has_challenge_path(&ingress);
        if routed {
            left.push("the HTTP-01 path".to_owned());
        }
        Some(left)
    };
    let cleaned = wait_for(Duration::from_secs(60), || async {
        left().await.filter(Vec::is_empty)
    })
    .await;
    if cleaned.is_err() {
        anyhow::bail!(
            "60 s after the namespace lost its label, sidecert still has {:?} there",
            left().await
        );
    }
    // Through Traefik, the challenge path is the app's again (its `/` Prefix: httpd's 404).
    let probe = format!("{ACME_CHALLENGE_PATH}sidecert-e2e-probe");
    wait_answer(
        ctx.plane,
        host,
        &probe,
        Duration::from_secs(20),
        "the app's 404 page after the cleanup",
        |r| r.status == 404 && r.body.contains(APP_NOT_FOUND),
    )
    .await?;
    let sa = format!("--as=system:serviceaccount:{}:default", ns.name());
    let out = ctx
        .kubectl(
            &["auth", "can-i", "-n", ns.name(), &sa, "update", "secrets/web-tls"],
            None,
        )
        .await?;
    ensure!(
        out.stdout.trim() == "no",
        "the Pods' ServiceAccount may still update its certificate's Secret: {}",
        out.describe()
    );
    let kept = ns.api::<Secret>().get("web-tls").await?;
    ensure!(
        kept.data == issued.data,
        "the certificate's Secret changed when the namespace lost its label"
    );
    Ok(())
}

/// Scenario 11 (last: it uninstalls the chart): in a labelled namespace with an annotated
/// Ingress and an injected Pod, `helm uninstall` runs the chart's pre-delete cleanup first:
/// sidecert's HTTP-01 path, solver Service, Role and RoleBinding go; the certificate Secret and
/// the host claim stay.
async fn s11_uninstall(ctx: &Ctx) -> Result<()> {
    let ns = ctx.plane.namespace("e2e-s11", true).await?;
    let result = async {
        let hosts = vec![host("web", &ns)];
        let manifest = web_app("web", &hosts, "web-tls", 1, json!({}), json!({}));
        ctx.kubectl_ok(
            &["-n", ns.name(), "apply", "-f", "-"],
            Some(&manifest.to_string()),
        )
        .await?;
        let roles = ns.api::<k8s_openapi::api::rbac::v1::Role>();
        wait_for(Duration::from_secs(60), || async {
            roles.get_opt("sidecert-default").await.ok()?.map(drop)
        })
        .await
        .context("the injected Pod's Role")?;
        ensure!(
            ctx.claim_holder(&hosts[0]).await?.is_some(),
            "no claim of {}",
            hosts[0]
        );
        // What the uninstall must take away is there first.
        let solver = format!("web{SOLVER_SERVICE_SUFFIX}");
        ensure!(
            has_challenge_path(&ns.api::<Ingress>().get("web").await?),
            "the Ingress has no HTTP-01 path before the uninstall"
        );
        ensure!(
            ns.api::<Service>().get_opt(&solver).await?.is_some(),
            "no solver Service before the uninstall"
        );

        ctx.helm_ok(&[
            "uninstall",
            RELEASE,
            "-n",
            &ctx.release_ns,
            "--wait",
            "--timeout",
            "120s",
        ])
        .await?;

        let managed = ListParams::default().labels("app.kubernetes.io/managed-by=sidecert");
        let left: Vec<String> = roles
            .list_metadata(&managed)
            .await?
            .items
            .into_iter()
            .map(|r| format!("Role {}", r.metadata.name.unwrap_or_default()))
            .chain(
                ns.api::<k8s_openapi::api::rbac::v1::RoleBinding>()
                    .list_metadata(&managed)
                    .await?
                    .items
                    .into_iter()
                    .map(|b| format!("RoleBinding {}", b.metadata.name.unwrap_or_default())),
            )
            .chain(
                ns.api::<Service>()
                    .list_metadata(&managed)
                    .await?
                    .items
                    .into_iter()
                    .map(|s| format!("Service {}", s.metadata.name.unwrap_or_default())),
            )
            .collect();
        ensure!(left.is_empty(), "after helm uninstall, sidecert left {left:?}");
        let ingress = ns.api::<Ingress>().get("web").await?;
        let routed = has_challenge_path(&ingress);
        ensure!(
            !routed,
            "after helm uninstall, the Ingress still has the HTTP-01 path"
        );
        ensure!(
            ns.api::<Secret>().get_opt("web-tls").await?.is_some(),
            "the certificate Secret went with the uninstall"
        );
        // The claim stays: it grants nothing, and keeps the host this namespace's across a
        // reinstall.
        ensure!(
            ctx.claim_holder(&hosts[0]).await?.as_deref() == Some(ns.name()),
            "the host claim went with the uninstall"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        ctx.dump(ns.name()).await;
        ctx.dump_webhook().await;
    }
    let _ = ns.cleanup().await;
    result
}

/// Scenario 2: Renewal with Pebble's `shortlived` profile (120 s): the Secret's certificate changes
/// before the first one expires, with exactly one more order (so no second order ran beside
/// it) and no restart.
async fn s2_renewal(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(&[("e2e-s2", true)], |namespaces| async move {
            let ns = &namespaces[0];
            let hosts = vec![host("short", ns)];
            // What most installations turn on: every plain-HTTP request redirected to HTTPS.
            // The same router Traefik's `entryPoints.web.http.redirections` makes, scoped to
            // this scenario's host (the plane's Traefik serves the others plain HTTP).
            let _redirect = Redirect::to_https(ctx.plane, ns.name(), &hosts[0]).await?;
            let applied = Instant::now();
            let manifest = web_app(
                "short",
                &hosts,
                "short-tls",
                2,
                json!({annotations::ACME_PROFILE: "shortlived"}),
                json!({}),
            );
            ctx.kubectl_ok(
                &["-n", ns.name(), "apply", "-f", "-"],
                Some(&manifest.to_string()),
            )
            .await?;
            let pods_api: Api<Pod> = ns.api();
            let pods = running_pods(&pods_api, "app=short", 2, Duration::from_secs(60)).await?;
            let uids: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
            for pod in &pods {
                ensure!(sidecar(pod).is_some(), "Pod {} has no sidecar", pod_name(pod));
            }

            let secrets: Api<Secret> = ns.api();
            let first = wait_issued(&secrets, "short-tls", Duration::from_secs(90)).await?;
            let first = check_issued(ctx.plane, &first, &hosts).await?;
            let lifetime = first.not_after - first.not_before;
            ensure!(
                lifetime <= 130,
                "certificate lives {lifetime}s: the shortlived profile was not used"
            );
            eprintln!(
                "scenario 2: first certificate {} valid {lifetime}s, until {}, validated through the redirect",
                first.serial, first.not_after
            );
            // Pebble asked on HTTP, got the redirect and fetched the token on Traefik's
            // HTTPS entrypoint (its access log names the router, `websecure-<namespace>-...`).
            let tokens = pebble_tokens(ctx.plane, &hosts[0]);
            let access_log = ctx
                .kubectl_ok(&["-n", "sidecert-ingress", "logs", "deploy/traefik"], None)
                .await?
                .stdout;
            let over_https = format!("\"websecure-{}-", ns.name());
            ensure!(
                !tokens.is_empty()
                    && tokens.iter().any(|t| access_log.lines().any(|l| {
                        l.contains(&format!("GET {ACME_CHALLENGE_PATH}{t} ")) && l.contains(" 200 ") && l.contains(&over_https)
                    })),
                "Traefik's access log shows no challenge ({tokens:?}) answered on its HTTPS entrypoint"
            );
            let root = ctx.plane.pebble_root_pem().await?;
            let (served_after, _) = wait_served(
                ctx.plane,
                &hosts[0],
                Expect::issued(&first.serial, &root),
                applied,
                Duration::from_secs(30),
            )
            .await?;
            eprintln!(
                "scenario 2: apply -> issued certificate served through the ingress: {:.1} s",
                served_after.as_secs_f64()
            );

            let left = (first.not_after - now_unix()).max(1) as u64;
            let renewed = wait_for(Duration::from_secs(left + 10), || {
                let secrets = secrets.clone();
                let serial = first.serial.clone();
                async move {
                    let s = secrets.get_opt("short-tls").await.ok().flatten()?;
                    let info = check_chain(&tls_crt(&s)?, None).ok()?;
                    (info.serial != serial).then(|| (s, now_unix()))
                }
            })
            .await
            .context("the certificate was not renewed")?;
            let (renewed, seen_at) = renewed;
            ensure!(
                seen_at < first.not_after,
                "renewed certificate seen at {seen_at}, after the first expired at {}",
                first.not_after
            );
            let second = check_issued(ctx.plane, &renewed, &hosts).await?;
            ensure!(
                second.not_after > first.not_after,
                "renewed certificate does not outlive the first"
            );
            eprintln!(
                "scenario 2: renewed to {} {}s before the first expired",
                second.serial,
                first.not_after - seen_at
            );
            let renewed_at = Instant::now();
            let (served_after, _) = wait_served(
                ctx.plane,
                &hosts[0],
                Expect::issued(&second.serial, &root),
                renewed_at,
                Duration::from_secs(30),
            )
            .await?;
            eprintln!(
                "scenario 2: renewed certificate served through the ingress {:.1} s after the test saw the Secret change",
                served_after.as_secs_f64()
            );

            tokio::time::sleep(Duration::from_secs(2)).await;
            let pods = pods_api
                .list(&ListParams::default().labels("app=short"))
                .await?
                .items;
            let now_uids: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
            ensure!(now_uids == uids, "the Pods were replaced");
            for pod in &pods {
                ensure!(restarts(pod) == 0, "Pod {} restarted", pod_name(pod));
            }
            let orders = sidecar_metric_sum(&pods, "sidecert_orders_total", "").await?;
            let issued = sidecar_metric_sum(&pods, "sidecert_orders_total", "result=\"issued\"").await?;
            ensure!(
                orders == 2.0 && issued == 2.0,
                "the sidecars made {orders} orders ({issued} issued), want exactly 2 (first + renewal)"
            );
            let leaders = sidecar_metric_sum(&pods, "sidecert_leader", "").await?;
            ensure!(leaders == 1.0, "{leaders} replicas hold the Lease, want 1");
            Ok(())
        })
        .await
}

/// An HTTP-to-HTTPS redirect of `host` on Traefik's HTTP entrypoint, through its file
/// provider; removed again on drop.
struct Redirect(PathBuf);

impl Redirect {
    /// Turns it on and waits until Traefik answers plain HTTP for `host` with the redirect.
    async fn to_https(plane: &Plane, name: &str, host: &str) -> Result<Redirect> {
        let dir = plane.traefik_dynamic_dir();
        let path = dir.join(format!("{name}.yaml"));
        let https_port = plane.ingress_https().port();
        // Priority: the highest a user may give (math.MaxInt - 1000); Traefik gives its own
        // entrypoint redirections math.MaxInt - 1, above every router as well.
        let yaml = format!(
            "http:\n  routers:\n    {name}-to-https:\n      entryPoints: [web]\n      rule: \"Host(`{host}`)\"\n      \
             priority: {}\n      middlewares: [{name}-to-https]\n      service: noop@internal\n  middlewares:\n    \
             {name}-to-https:\n      redirectScheme: {{scheme: https, port: \"{https_port}\", permanent: true}}\n",
            i64::MAX - 1000
        );
        // Readable by Traefik (uid 65532) whatever the umask, and renamed into place so its
        // file watch never reads half a file.
        let partial = dir.join(format!(".{name}.yaml.partial"));
        tokio::fs::write(&partial, yaml)
            .await
            .with_context(|| format!("write {}", partial.display()))?;
        std::fs::set_permissions(&partial, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        tokio::fs::rename(&partial, &path)
            .await
            .with_context(|| format!("rename {} to {}", partial.display(), path.display()))?;
        let redirect = Redirect(path);
        let probe = format!("{ACME_CHALLENGE_PATH}sidecert-e2e-probe");
        let want = format!("https://{host}:{https_port}{probe}");
        wait_for(Duration::from_secs(20), || async {
            let r = ingress::http_get(plane.ingress_http(), host, &probe).await.ok()?;
            // Permanent: 301 for a GET (308 for other methods).
            (matches!(r.status, 301 | 308) && r.header("location") == Some(want.as_str())).then_some(())
        })
        .await
        .with_context(|| format!("Traefik does not redirect http://{host}{probe} to {want}"))?;
        Ok(redirect)
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Scenario 3: A Pod with the direct annotations and no Ingress gets its own certificate.
async fn s3_direct_pod(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(&[("e2e-s3", true)], |namespaces| async move {
            let ns = &namespaces[0];
            let domain = host("direct", ns);
            let pod = app_pod(
                "direct",
                json!({"app": "direct"}),
                direct_annotations(&domain, "direct-tls"),
            );
            ctx.kubectl_ok(&["-n", ns.name(), "apply", "-f", "-"], Some(&pod.to_string()))
                .await?;
            let pods_api: Api<Pod> = ns.api();
            let pods = running_pods(&pods_api, "app=direct", 1, Duration::from_secs(60)).await?;
            ensure!(sidecar(&pods[0]).is_some(), "Pod direct has no sidecar");
            let secrets: Api<Secret> = ns.api();
            let issued = wait_issued(&secrets, "direct-tls", Duration::from_secs(90)).await?;
            let info = check_issued(ctx.plane, &issued, std::slice::from_ref(&domain)).await?;
            eprintln!("scenario 3: issued serial {} for {:?}", info.serial, info.sans);
            let pod = pods_api.get("direct").await?;
            ensure!(restarts(&pod) == 0, "Pod direct restarted");
            // Issued with a Role that has no `create` on Secrets or Leases: the webhook made
            // the account Secret (the sidecar filled it) and the Lease. Every container of
            // the ServiceAccount may touch exactly those names, and create nothing else.
            let sa = format!("--as=system:serviceaccount:{}:default", ns.name());
            for (what, allowed) in [
                (vec!["update", "secrets/direct-tls"], true),
                (
                    vec!["update", "leases.coordination.k8s.io/sidecert-direct-tls"],
                    true,
                ),
                (vec!["create", "secrets"], false),
                (vec!["create", "leases.coordination.k8s.io"], false),
                (vec!["get", "secrets/other-tls"], false),
            ] {
                let mut args = vec!["auth", "can-i", "-n", ns.name(), sa.as_str()];
                args.extend(what.iter().copied());
                let out = ctx.kubectl(&args, None).await?;
                ensure!(
                    out.stdout.trim() == if allowed { "yes" } else { "no" },
                    "kubectl auth can-i {} as the Pod's ServiceAccount: expected {}: {}",
                    what.join(" "),
                    if allowed { "yes" } else { "no" },
                    out.describe()
                );
            }
            let account = secrets
                .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=sidecert"))
                .await?
                .items
                .into_iter()
                .find(|s| {
                    s.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("sidecert-acme-account-"))
                });
            ensure!(
                account.is_some_and(|s| s.data.is_some_and(|d| d.contains_key("credentials.json"))),
                "no filled account Secret"
            );
            Ok(())
        })
        .await
}

/// The parts of a Pod spec Pod Security `restricted` asks of every container.
fn restricted(container: &mut Value) {
    container["securityContext"] = json!({"allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": true,
        "seccompProfile": {"type": "RuntimeDefault"}});
}

/// When a container of `pod` last started running (RFC 3339, second resolution).
/// A container's start, as the kubelet reports it (RFC 3339, to the second: two containers
/// started within the same second compare equal).
fn started_at(pod: &Pod, name: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find(|c| c.name == name)?
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()
        .map(|t| t.0.to_string())
}

/// Scenario 10: in a namespace that enforces Pod Security `restricted`, an
/// annotated Ingress's Deployment mounts the certificate Secret: the injected Pod is admitted,
/// the native sidecar runs before the app starts, and the app's mounted file turns from the
/// temporary certificate into the issued one with no restart. A Job with an injected sidecar
/// completes (the kubelet stops the sidecar after the Job's container ends).
async fn s10_real_kubelet(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(&[("e2e-s10", true)], |namespaces| async move {
            let ns = &namespaces[0];
            ctx.kubectl_ok(
                &[
                    "label",
                    "namespace",
                    ns.name(),
                    "pod-security.kubernetes.io/enforce=restricted",
                ],
                None,
            )
            .await?;
            let domain = host("mounted", ns);
            let mut list = web_app(
                "mounted",
                std::slice::from_ref(&domain),
                "mounted-tls",
                1,
                json!({}),
                json!({}),
            );
            let spec = &mut list["items"][2]["spec"]["template"]["spec"];
            spec["volumes"] = json!([{"name": "tls", "secret": {"secretName": "mounted-tls"}}]);
            let app = &mut spec["containers"][0];
            app["volumeMounts"] = json!([{"name": "tls", "mountPath": "/tls", "readOnly": true}]);
            restricted(app);
            ctx.kubectl_ok(&["-n", ns.name(), "apply", "-f", "-"], Some(&list.to_string()))
                .await?;
            let pods_api: Api<Pod> = ns.api();
            let pods = running_pods(&pods_api, "app=mounted", 1, Duration::from_secs(60))
                .await
                .context("admitted under Pod Security restricted, with the sidecar")?;
            let pod = &pods[0];
            let name = pod_name(pod).to_owned();
            ensure!(sidecar(pod).is_some(), "Pod {name} has no sidecar");
            let (side, app) = (started_at(pod, SIDECAR_CONTAINER_NAME), started_at(pod, "app"));
            ensure!(
                side.is_some() && app.is_some() && side <= app,
                "the native sidecar started at {side:?}, the app at {app:?}"
            );
            let secrets: Api<Secret> = ns.api();
            // While the Secret still holds the temporary certificate, so does the app's file:
            // the app had HTTPS before any order.
            let cat_tls = |name: String| {
                let ctx = ctx.clone();
                let ns = ns.name().to_owned();
                async move {
                    ctx.kubectl(
                        &["-n", &ns, "exec", &name, "-c", "app", "--", "cat", "/tls/tls.crt"],
                        None,
                    )
                    .await
                    .ok()
                    .filter(|out| out.success)
                    .map(|out| out.stdout)
                }
            };
            let before = secrets.get("mounted-tls").await?;
            if annotation(&before, annotations::TEMPORARY) == Some("true") {
                let mounted = cat_tls(name.clone())
                    .await
                    .context("cat /tls/tls.crt in the app")?;
                let now = secrets.get("mounted-tls").await?;
                if annotation(&now, annotations::TEMPORARY) == Some("true") {
                    ensure!(
                        Some(&mounted) == tls_crt(&now).as_ref(),
                        "the app's mounted tls.crt is not the temporary certificate"
                    );
                }
            }
            let issued = wait_issued(&secrets, "mounted-tls", Duration::from_secs(90)).await?;
            let want = tls_crt(&issued).context("tls.crt")?;
            // The kubelet refreshes Secret volumes on its sync (syncFrequency 10 s here).
            let started = Instant::now();
            wait_for(Duration::from_secs(60), || {
                let (cat, name, want) = (cat_tls, name.clone(), want.clone());
                async move { (cat(name).await? == want).then_some(()) }
            })
            .await
            .context("the mounted tls.crt never became the issued certificate")?;
            eprintln!(
                "scenario 10: the mounted file held the issued certificate {:.1}s after the Secret did",
                started.elapsed().as_secs_f32()
            );
            let pod = pods_api.get(&name).await?;
            ensure!(restarts(&pod) == 0, "Pod {name} restarted");

            let job_domain = host("job", ns);
            let mut container = json!({"name": "work", "image": APP_IMAGE,
                "command": ["sh", "-c", "echo working; sleep 2; echo done"]});
            restricted(&mut container);
            let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
                "spec": {"backoffLimit": 0, "template": {
                    "metadata": {"annotations": direct_annotations(&job_domain, "job-tls")},
                    "spec": {"restartPolicy": "Never", "containers": [container]}}}});
            let started = Instant::now();
            ctx.kubectl_ok(&["-n", ns.name(), "apply", "-f", "-"], Some(&job.to_string()))
                .await?;
            let jobs: Api<Job> = ns.api();
            wait_for(Duration::from_secs(90), || {
                let jobs = jobs.clone();
                async move {
                    let job = jobs.get("once").await.ok()?;
                    let conditions = job.status?.conditions?;
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Complete" && c.status == "True")
                        .then_some(())
                }
            })
            .await
            .context("the Job with an injected sidecar did not complete")?;
            let job_pods = pods_api
                .list(&ListParams::default().labels("job-name=once"))
                .await?;
            ensure!(
                !job_pods.items.is_empty() && job_pods.items.iter().all(|p| sidecar(p).is_some()),
                "the Job's Pod is gone or has no sidecar"
            );
            eprintln!(
                "scenario 10: the Job with an injected sidecar completed in {:.1}s",
                started.elapsed().as_secs_f32()
            );
            Ok(())
        })
        .await
}

/// Scenario 4: A namespace without the label (annotated Ingress, Pods asking for injection) and a
/// Pod with `sidecert.io/inject: "false"` in a labelled one: untouched.
async fn s4_untouched(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(
            &[("e2e-s4-off", false), ("e2e-s4-optout", true)],
            |namespaces| async move {
                let (off, optout) = (&namespaces[0], &namespaces[1]);

                // Unlabelled namespace: the webhook is never called.
                let hosts = vec![host("web", off)];
                let manifest = web_app("web", &hosts, "web-tls", 1, json!({}), json!({}));
                ctx.kubectl_ok(
                    &["-n", off.name(), "apply", "-f", "-"],
                    Some(&manifest.to_string()),
                )
                .await?;
                let pod = app_pod(
                    "direct",
                    json!({"app": "direct"}),
                    direct_annotations(&host("direct", off), "direct-tls"),
                );
                ctx.kubectl_ok(&["-n", off.name(), "apply", "-f", "-"], Some(&pod.to_string()))
                    .await?;
                let pods_api: Api<Pod> = off.api();
                running_pods(&pods_api, "app=web", 1, Duration::from_secs(60)).await?;
                running_pods(&pods_api, "app=direct", 1, Duration::from_secs(60)).await?;
                for pod in pods_api.list(&ListParams::default()).await?.items {
                    ensure!(
                        sidecar(&pod).is_none(),
                        "Pod {} in an unlabelled namespace got the sidecar",
                        pod_name(&pod)
                    );
                    let status = pod
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(annotations::STATUS));
                    ensure!(status.is_none(), "Pod {} carries {status:?}", pod_name(&pod));
                }
                let ingress = off.api::<Ingress>().get("web").await?;
                let paths: Vec<_> = ingress
                    .spec
                    .iter()
                    .flat_map(|s| s.rules.iter().flatten())
                    .flat_map(|r| r.http.iter().flat_map(|h| &h.paths))
                    .filter_map(|p| p.path.clone())
                    .collect();
                ensure!(
                    paths == ["/"],
                    "the Ingress in an unlabelled namespace was changed: paths {paths:?}"
                );
                let secrets: Vec<String> = off
                    .api::<Secret>()
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter_map(|s| s.metadata.name)
                    .collect();
                ensure!(
                    secrets.is_empty(),
                    "Secrets appeared in an unlabelled namespace: {secrets:?}"
                );
                ensure!(
                    off.api::<Service>()
                        .get_opt(&format!("web{SOLVER_SERVICE_SUFFIX}"))
                        .await?
                        .is_none(),
                    "a solver Service appeared in an unlabelled namespace"
                );

                // Labelled namespace, Pods behind an annotated Ingress but opting out.
                let hosts = vec![host("optout", optout)];
                let manifest = web_app(
                    "optout",
                    &hosts,
                    "optout-tls",
                    2,
                    json!({}),
                    json!({annotations::INJECT: "false"}),
                );
                ctx.kubectl_ok(
                    &["-n", optout.name(), "apply", "-f", "-"],
                    Some(&manifest.to_string()),
                )
                .await?;
                let mut annotations = direct_annotations(&host("bare", optout), "bare-tls");
                annotations[annotations::INJECT] = json!("false");
                let pod = app_pod("bare", json!({"app": "bare"}), annotations);
                ctx.kubectl_ok(&["-n", optout.name(), "apply", "-f", "-"], Some(&pod.to_string()))
                    .await?;
                let pods_api: Api<Pod> = optout.api();
                running_pods(&pods_api, "app=optout", 2, Duration::from_secs(60)).await?;
                running_pods(&pods_api, "app=bare", 1, Duration::from_secs(60)).await?;
                for pod in pods_api.list(&ListParams::default()).await?.items {
                    ensure!(
                        sidecar(&pod).is_none(),
                        "Pod {} with inject=false got the sidecar",
                        pod_name(&pod)
                    );
                    ensure!(
                        pod.spec.as_ref().map(|s| s.containers.len()) == Some(1)
                            && pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.init_containers.as_ref())
                                .is_none_or(Vec::is_empty),
                        "Pod {} was changed",
                        pod_name(&pod)
                    );
                }
                ensure!(
                    optout.api::<Secret>().get_opt("bare-tls").await?.is_none(),
                    "a Secret was made for the opted-out Pod"
                );
                Ok(())
            },
        )
        .await
}

/// Scenario 5: `kubectl apply --dry-run=server`: the webhook reviews (the returned objects are
/// mutated), nothing is created.
async fn s5_dry_run(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(&[("e2e-s5", true)], |namespaces| async move {
            let ns = &namespaces[0];
            let hosts = vec![host("web", ns)];
            let mut manifest = web_app("web", &hosts, "web-tls", 2, json!({}), json!({}));
            let pod = app_pod(
                "direct",
                json!({"app": "direct"}),
                direct_annotations(&host("direct", ns), "direct-tls"),
            );
            manifest["items"].as_array_mut().context("items")?.push(pod);
            let out = ctx
                .kubectl_ok(
                    &[
                        "-n",
                        ns.name(),
                        "apply",
                        "--dry-run=server",
                        "-o",
                        "json",
                        "-f",
                        "-",
                    ],
                    Some(&manifest.to_string()),
                )
                .await?;
            let returned: Value = serde_json::from_str(&out.stdout).context("kubectl -o json output")?;
            let items = returned["items"].as_array().context("returned items")?;
            let find = |kind: &str| {
                items
                    .iter()
                    .find(|i| i["kind"] == kind)
                    .cloned()
                    .unwrap_or_default()
            };
            let ingress: Ingress = serde_json::from_value(find("Ingress"))?;
            let routed = has_challenge_path(&ingress);
            ensure!(
                routed,
                "the dry-run Ingress was not mutated (was the webhook called?)"
            );
            let pod: Pod = serde_json::from_value(find("Pod"))?;
            ensure!(
                sidecar(&pod).is_some(),
                "the dry-run Pod has no sidecar (was the webhook called?)"
            );

            // Side effects would be synchronous with the review; give stragglers a moment.
            tokio::time::sleep(Duration::from_secs(2)).await;
            // A dry run claims no host.
            for h in [host("web", ns), host("direct", ns)] {
                let holder = ctx.claim_holder(&h).await?;
                ensure!(holder.is_none(), "the dry run claimed {h} for {holder:?}");
            }
            let left = ctx
                .kubectl_ok(
                    &[
                        "-n",
                        ns.name(),
                        "get",
                        "pods,services,deployments,ingresses,secrets,roles,rolebindings,leases",
                        "-o",
                        "name",
                    ],
                    None,
                )
                .await?;
            ensure!(
                left.stdout.trim().is_empty(),
                "the dry run created:\n{}",
                left.stdout
            );
            Ok(())
        })
        .await
}

/// A POST to /mutate on each webhook Pod's IP, as any Pod in the cluster could send it: 401
/// with `webhook.clientCA` set; `/healthz` answers 200 on the same port.
async fn direct_review_is_refused(ctx: &Ctx) -> Result<()> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ctx.release_ns)
        .list(&ListParams::default().labels("app.kubernetes.io/component=webhook"))
        .await?
        .items;
    ensure!(!pods.is_empty(), "no webhook Pods in {}", ctx.release_ns);
    // The serving certificate names the Service, not the Pod IP; what is checked here is the
    // client side, so the server's name is not.
    let http = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(5))
        .build()?;
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "5eedce27-0000-4000-8000-0000000000f9", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "kube-system", "userInfo": {"username": "forger"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "forged",
                "annotations": {"sidecert.io/domains": "forged.example"}},
                "spec": {"containers": [{"name": "app", "image": "app"}]}}}});
    for pod in &pods {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .with_context(|| format!("webhook Pod {} has no IP", pod_name(pod)))?;
        let rsp = http
            .post(format!("https://{ip}:8443/mutate"))
            .json(&review)
            .send()
            .await
            .with_context(|| format!("POST /mutate to webhook Pod {}", pod_name(pod)))?;
        ensure!(
            rsp.status() == reqwest::StatusCode::UNAUTHORIZED,
            "a review without the API server's certificate got {} from webhook Pod {}",
            rsp.status(),
            pod_name(pod)
        );
        let health = http.get(format!("https://{ip}:8443/healthz")).send().await?;
        ensure!(
            health.status().is_success(),
            "/healthz of {}: {}",
            pod_name(pod),
            health.status()
        );
    }
    Ok(())
}

/// Scenario 9: the chart's ValidatingAdmissionPolicy makes the API server itself refuse the
/// webhook ServiceAccount's writes outside labelled namespaces (whatever its ClusterRole
/// allows), so a forged review cannot make it write in `kube-system`. Checked by
/// impersonating the ServiceAccount with server-side dry runs: nothing is created.
async fn s9_namespace_guard(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(
            &[("e2e-s9", true), ("e2e-s9-off", false)],
            |namespaces| async move {
                let (on, off) = (namespaces[0].name(), namespaces[1].name());
                let as_webhook = format!(
                    "--as=system:serviceaccount:{}:{}",
                    ctx.release_ns,
                    ctx.webhook_deployment()
                );
                let refused = "sidecert's webhook";
                let attempt = |ns: String, args: Vec<String>| {
                    let ctx = ctx.clone();
                    let as_webhook = as_webhook.clone();
                    async move {
                        let mut all = vec![as_webhook, "-n".to_owned(), ns];
                        all.extend(args);
                        let all: Vec<&str> = all.iter().map(String::as_str).collect();
                        ctx.kubectl(&all, None).await
                    }
                };
                let secret = |name: &str| {
                    [
                        "create",
                        "secret",
                        "generic",
                        name,
                        "--from-literal=k=v",
                        "--dry-run=server",
                    ]
                    .map(str::to_owned)
                    .to_vec()
                };
                let role = [
                    "create",
                    "role",
                    "s9-probe",
                    "--verb=get",
                    "--resource=secrets",
                    "--dry-run=server",
                ]
                .map(str::to_owned)
                .to_vec();

                // Where the namespace opted in, only what sidecert writes: a temporary TLS
                // Secret labelled as its own (not any Secret), its own Roles (not others).
                let out = attempt(on.to_owned(), secret("s9-probe")).await?;
                ensure!(
                    !out.success && out.stderr.contains("creates only temporary TLS Secrets"),
                    "a generic Secret in a labelled namespace: {}",
                    out.describe()
                );
                let temporary = json!({
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                    "metadata": {"name": "s9-temporary",
                        "labels": {"app.kubernetes.io/managed-by": "sidecert"},
                        "annotations": {"sidecert.io/temporary": "true"}},
                    "data": {"tls.crt": "", "tls.key": ""}
                });
                let out = ctx
                    .kubectl(
                        &[&as_webhook, "-n", on, "create", "--dry-run=server", "-f", "-"],
                        Some(&temporary.to_string()),
                    )
                    .await?;
                ensure!(out.success, "a temporary TLS Secret in a labelled namespace: {}", out.describe());
                // The empty account Secret and a certificate's Lease: the webhook makes what
                // the sidecar's Role names (it has no `create`). A filled one, or another
                // Lease, is refused.
                let account = |data: Value| {
                    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": "sidecert-acme-account-0123456789ab",
                            "labels": {"app.kubernetes.io/managed-by": "sidecert"}},
                        "data": data})
                };
                let lease = |name: &str, holder: Option<&str>| {
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": name,
                            "labels": {"app.kubernetes.io/managed-by": "sidecert"}},
                        "spec": holder.map_or(json!({}), |h| json!({"holderIdentity": h}))})
                };
                // sidecert's HTTP-01 HTTPRoute, and ones it never writes.
                let route = |name: &str, labelled: bool, path: &str, backend: &str| {
                    let labels = if labelled {
                        json!({"app.kubernetes.io/managed-by": "sidecert"})
                    } else {
                        json!({})
                    };
                    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                        "metadata": {"name": name, "labels": labels},
                        "spec": {"parentRefs": [{"name": "edge", "sectionName": "http"}],
                            "hostnames": ["a.example"],
                            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": path}}],
                                       "backendRefs": [{"name": backend, "port": 80}]}]}})
                };
                let challenge = ACME_CHALLENGE_PATH;
                for (object, allowed, what) in [
                    (route("gw.edge.web-sidecert-solver", true, challenge, "web-sidecert-solver"), true, "sidecert's HTTPRoute"),
                    (route("gw.edge.web-sidecert-solver", false, challenge, "web-sidecert-solver"), false, "an unlabelled HTTPRoute"),
                    (route("tenant-route", true, challenge, "web-sidecert-solver"), false, "an HTTPRoute of another name"),
                    (route("gw.edge.web-sidecert-solver", true, "/", "web-sidecert-solver"), false, "an HTTPRoute of every path"),
                    (route("gw.edge.web-sidecert-solver", true, challenge, "web"), false, "an HTTPRoute to an app's Service"),
                    (account(json!({})), true, "an empty account Secret"),
                    (account(json!({"credentials.json": "e30="})), false, "an account Secret with a key"),
                    (lease("sidecert-web-tls", None), true, "a certificate's Lease"),
                    (lease("other-lease", None), false, "a Lease of another name"),
                    (lease("sidecert-web-tls", Some("me")), false, "a Lease with a holder"),
                ] {
                    let out = ctx
                        .kubectl(
                            &[&as_webhook, "-n", on, "create", "--dry-run=server", "-f", "-"],
                            Some(&object.to_string()),
                        )
                        .await?;
                    ensure!(
                        out.success == allowed && (allowed || out.stderr.contains(refused)),
                        "{what} in a labelled namespace: expected {}: {}",
                        if allowed { "allowed" } else { "refused by the policy" },
                        out.describe()
                    );
                }
                let out = attempt(on.to_owned(), role.clone()).await?;
                ensure!(
                    !out.success && out.stderr.contains("its own sidecar Roles"),
                    "a Role of another name in a labelled namespace: {}",
                    out.describe()
                );
                // A tenant's Role of a sidecert-* name is not adopted by labelling it.
                let tenant = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": "sidecert-s9-tenant"},
                    "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                        "resourceNames": ["web-tls"]}]});
                let out = ctx
                    .kubectl(&["-n", on, "create", "-o", "json", "-f", "-"], Some(&tenant.to_string()))
                    .await?;
                ensure!(out.success, "the tenant's Role: {}", out.describe());
                let mut adopted: Value = serde_json::from_str(&out.stdout)?;
                adopted["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "sidecert"});
                let out = ctx
                    .kubectl(
                        &[&as_webhook, "-n", on, "replace", "--dry-run=server", "-f", "-"],
                        Some(&adopted.to_string()),
                    )
                    .await?;
                ensure!(
                    !out.success && out.stderr.contains("never one that was not labelled so"),
                    "a tenant's sidecert-* Role adopted by labelling it: {}",
                    out.describe()
                );
                // Its own Roles hold only the sidecar's rules: a sidecert-* Role granting
                // create on every Secret (then bound to a ServiceAccount of the thief's
                // choosing) is refused; the sidecar's own rules are not.
                let sidecar_role = |rules: Value| {
                    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                        "metadata": {"name": "sidecert-s9-probe",
                            "labels": {"app.kubernetes.io/managed-by": "sidecert"}},
                        "rules": rules})
                };
                let named = |group: &str, resource: &str, verbs: Value| {
                    let name = if resource == "leases" { "sidecert-web-tls" } else { "web-tls" };
                    json!({"apiGroups": [group], "resources": [resource], "verbs": verbs,
                        "resourceNames": [name]})
                };
                let rw = json!(["get", "list", "watch", "update", "patch"]);
                // Some: refused by the policy (the webhook holds the right, so RBAC's own
                // escalation check lets it through); None: either refuses.
                let policy = "only the sidecar's rules";
                let escalation = "not currently held";
                for (rules, allowed, by_policy, what) in [
                    (
                        json!([named("", "secrets", rw.clone()),
                            named("coordination.k8s.io", "leases", rw.clone()),
                            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
                            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                            named("", "secrets", json!(["get"]))]),
                        true,
                        false,
                        "the sidecar's rules",
                    ),
                    (json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get"]}]), false, true, "create on every Secret"),
                    (json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]), false, true, "get on every Secret"),
                    (json!([named("coordination.k8s.io", "leases", json!(["create"]))]), false, true, "create on Leases"),
                    (json!([named("", "services", json!(["get"]))]), false, true, "a rule on Services"),
                    (json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"], "resourceNames": [""]}]), false, true, "list on every Secret (the name \"\")"),
                    (json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"], "resourceNames": ["app-leader"]}]), false, true, "another app's Lease"),
                    (json!([named("", "secrets", json!(["get", "delete"]))]), false, false, "delete on a Secret"),
                    (json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]), false, false, "every right"),
                ] {
                    let out = ctx
                        .kubectl(
                            &[&as_webhook, "-n", on, "create", "--dry-run=server", "-f", "-"],
                            Some(&sidecar_role(rules).to_string()),
                        )
                        .await?;
                    let refused_as_expected = out.stderr.contains(policy)
                        || (!by_policy && out.stderr.contains(escalation));
                    ensure!(
                        out.success == allowed && (allowed || refused_as_expected),
                        "a sidecert Role with {what} in a labelled namespace: expected {}: {}",
                        if allowed { "allowed" } else if by_policy { "refused by the policy" } else { "refused" },
                        out.describe()
                    );
                }

                // Sent straight to a webhook Pod, without the API server's client certificate,
                // a review is refused before it is read; the kubelet's probes still answer.
                direct_review_is_refused(&ctx).await?;

                // Refused by the API server elsewhere, with the policy's message.
                for (ns, args, what) in [
                    (
                        "kube-system".to_owned(),
                        secret("s9-probe"),
                        "a Secret in kube-system",
                    ),
                    ("kube-system".to_owned(), role.clone(), "a Role in kube-system"),
                    (
                        off.to_owned(),
                        secret("s9-probe"),
                        "a Secret in an unlabelled namespace",
                    ),
                    (
                        ctx.release_ns.clone(),
                        secret("s9-probe"),
                        "a Secret of another name in the release namespace",
                    ),
                ] {
                    let out = attempt(ns, args).await?;
                    ensure!(
                        !out.success && out.stderr.contains(refused),
                        "{what}: expected the namespace guard to refuse it: {}",
                        out.describe()
                    );
                }

                // Where the label came off, only sidecert's cleanup: deleting its own Roles,
                // RoleBindings and solver Services, and taking HTTP-01 paths off Ingresses
                // with nothing else changed. Each object is applied (as the admin) right
                // before its attempt: the leader's cleanup may have just removed it.
                let ours = json!({"app.kubernetes.io/managed-by": "sidecert"});
                let role_named = |name: &str, labels: &Value| {
                    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                        "metadata": {"name": name, "labels": labels},
                        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["web-tls"]}]})
                };
                let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": "sidecert-s9", "labels": ours},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sidecert-s9"},
                    "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": off}]});
                let service = |name: &str| {
                    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": ours},
                        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
                };
                let routed = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                    "metadata": {"name": "s9-ing"},
                    "spec": {"rules": [{"host": "s9.example", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
                        {"path": ACME_CHALLENGE_PATH, "pathType": "Prefix",
                         "backend": {"service": {"name": "web-sidecert-solver", "port": {"number": 80}}}}]}}]}});
                let patch = |ops: Value| -> Vec<String> {
                    ["patch", "ingress", "s9-ing", "--type=json", "-p", &ops.to_string(), "--dry-run=server"]
                        .map(str::to_owned)
                        .to_vec()
                };
                let delete = |what: &str| -> Vec<String> {
                    what.split(' ').chain(["--dry-run=server"]).map(str::to_owned).collect()
                };
                let take_off = json!([{"op": "remove", "path": "/spec/rules/0/http/paths/1"}]);
                for (object, args, allowed, what) in [
                    (role_named("sidecert-s9", &ours), delete("delete role sidecert-s9"), true, "deleting its Role"),
                    (role_named("sidecert-s9-theirs", &json!({})), delete("delete role sidecert-s9-theirs"), false, "deleting an unlabelled Role"),
                    (binding.clone(), delete("delete rolebinding sidecert-s9"), true, "deleting its RoleBinding"),
                    (service("web-sidecert-solver"), delete("delete service web-sidecert-solver"), true, "deleting its solver Service"),
                    (service("s9-web"), delete("delete service s9-web"), false, "deleting a Service not named as a solver"),
                    (routed.clone(), patch(take_off.clone()), true, "taking the HTTP-01 path off"),
                    (routed.clone(), patch(json!([{"op": "remove", "path": "/spec/rules/0/http/paths/0"}])), false, "taking the app's path off"),
                    (routed.clone(), patch(json!([{"op": "replace", "path": "/spec/rules/0/host", "value": "evil.example"},
                        {"op": "remove", "path": "/spec/rules/0/http/paths/1"}])), false, "changing the host"),
                    (routed.clone(), patch(json!([{"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}},
                        {"op": "remove", "path": "/spec/rules/0/http/paths/1"}])), false, "adding an annotation"),
                    (routed.clone(), patch(json!([{"op": "add", "path": "/spec/rules/0/http/paths/-",
                        "value": {"path": ACME_CHALLENGE_PATH, "pathType": "Exact",
                            "backend": {"service": {"name": "other-sidecert-solver", "port": {"number": 80}}}}}])), false, "adding an HTTP-01 path"),
                    (routed.clone(), patch(json!([{"op": "replace", "path": "/spec/rules/0/http/paths/1/pathType", "value": "Exact"}])), false, "changing an HTTP-01 path"),
                    (role_named("sidecert-s9-new", &ours), ["create", "role", "sidecert-s9-new", "--verb=get", "--resource=secrets", "--dry-run=server"].map(str::to_owned).to_vec(), false, "creating a Role"),
                ] {
                    let mut out = None;
                    for _ in 0..3 {
                        if !what.starts_with("creating") {
                            ctx.kubectl_ok(&["-n", off, "apply", "-f", "-"], Some(&object.to_string()))
                                .await?;
                        }
                        let tried = attempt(off.to_owned(), args.clone()).await?;
                        // Removed by the cleanup between the apply and the attempt: again.
                        let raced = !tried.success
                            && (tried.stderr.contains("NotFound") || tried.stderr.contains("not found")
                                || tried.stderr.contains("missing")
                                || tried.stderr.contains("Required value"));
                        out = Some(tried);
                        if !raced {
                            break;
                        }
                    }
                    let out = out.context("no attempt")?;
                    ensure!(
                        out.success == allowed && (allowed || out.stderr.contains(refused)),
                        "{what} in a namespace that lost its label: expected {}: {}",
                        if allowed { "allowed" } else { "refused by the policy" },
                        out.describe()
                    );
                }

                // In the release namespace, host claims (labelled) but no other Lease.
                let lease = |name: &str, claim: bool| {
                    let labels = if claim {
                        json!({"app.kubernetes.io/managed-by": "sidecert", "sidecert.io/claim": "host"})
                    } else {
                        json!({"app.kubernetes.io/managed-by": "sidecert"})
                    };
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": name, "labels": labels},
                        "spec": {"holderIdentity": on}})
                    .to_string()
                };
                for (name, claim, allowed) in [
                    ("sidecert-host-s9.example", true, true),
                    ("sidecert-host-s9.example", false, false),
                    ("s9-other-lease", true, false),
                ] {
                    let out = ctx
                        .kubectl(
                            &[&as_webhook, "-n", &ctx.release_ns, "create", "--dry-run=server", "-f", "-"],
                            Some(&lease(name, claim)),
                        )
                        .await?;
                    ensure!(
                        out.success == allowed && (allowed || out.stderr.contains(refused)),
                        "Lease {name} (claim label: {claim}) in the release namespace: expected {}: {}",
                        if allowed { "allowed" } else { "refused" },
                        out.describe()
                    );
                }

            // In a labelled namespace, only the writes sidecert makes: no Secret update, no
            // change to a workload's Pod spec, no binding of a Role that is not its own.
            let admin = |args: &[&str], stdin: Option<String>| {
                let ctx = ctx.clone();
                let args: Vec<String> = ["-n", on].iter().chain(args).map(|s| (*s).to_owned()).collect();
                async move {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    ctx.kubectl_ok(&args, stdin.as_deref()).await
                }
            };
            admin(&["create", "secret", "generic", "s9-theirs", "--from-literal=k=v"], None).await?;
            admin(&["create", "role", "s9-other", "--verb=get", "--resource=secrets"], None).await?;
            admin(&["create", "role", "sidecert-s9", "--verb=get", "--resource=secrets"], None).await?;
            admin(&["create", "deployment", "s9-app", "--image=example/app:1.0", "--replicas=0"], None).await?;
            let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
            // Its deletes of Roles, RoleBindings and Services are its own objects only,
            // labelled namespace or not.
            admin(&["create", "rolebinding", "s9-tenant-binding", "--role=s9-other", &format!("--serviceaccount={on}:default")], None).await?;
            let restart = r#"{"spec":{"template":{"metadata":{"annotations":{"sidecert.io/restarted-for":"s9"}}}}}"#;
            for (args, allowed, what) in [
                (owned(&["annotate", "secret", "s9-theirs", "x=y", "--dry-run=server"]), false, "updating a Secret"),
                (owned(&["delete", "role", "s9-other", "--dry-run=server"]), false, "deleting a tenant's Role"),
                (owned(&["delete", "rolebinding", "s9-tenant-binding", "--dry-run=server"]), false, "deleting a tenant's RoleBinding"),
                (owned(&["set", "image", "deployment/s9-app", "app=evil.example/x", "--dry-run=server"]), false, "changing a workload's image"),
                (owned(&["patch", "deployment", "s9-app", "-p", restart, "--dry-run=server"]), true, "a rollout restart"),
                (owned(&["create", "rolebinding", "s9-b", "--role=s9-other", &format!("--serviceaccount={on}:default"), "--dry-run=server"]), false, "binding another Role"),
                (owned(&["create", "rolebinding", "s9-c", "--role=sidecert-s9", "--serviceaccount=kube-system:default", "--dry-run=server"]), false, "binding its Role to another namespace's ServiceAccount"),
                (owned(&["create", "rolebinding", "s9-d", "--role=sidecert-s9", &format!("--serviceaccount={on}:default"), "--dry-run=server"]), true, "binding its Role in the namespace"),
            ] {
                let out = attempt(on.to_owned(), args).await?;
                ensure!(
                    out.success == allowed && (allowed || out.stderr.contains("sidecert's webhook")),
                    "{what} in a labelled namespace: expected {}: {}",
                    if allowed { "allowed" } else { "refused by the policy" },
                    out.describe()
                );
            }
            // The Role pruning: a sidecar Role of its own, marked, loses a name, or goes with
            // its binding.
            let pruned_role = |names: Value| {
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": "sidecert-s9-prune", "labels": {"app.kubernetes.io/managed-by": "sidecert"},
                        "annotations": {"sidecert.io/prune-candidate": "true"}},
                    "rules": [{"apiGroups": [""], "resources": ["secrets"],
                        "verbs": ["get", "list", "watch", "update", "patch"], "resourceNames": names}]})
                .to_string()
            };
            admin(&["create", "-f", "-"], Some(pruned_role(json!(["a-tls", "b-tls"])))).await?;
            admin(&["create", "-f", "-"], Some(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "sidecert-s9-prune", "labels": {"app.kubernetes.io/managed-by": "sidecert"}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sidecert-s9-prune"},
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": on}]}).to_string())).await?;
            let narrowed = ctx
                .kubectl(&[&as_webhook, "-n", on, "replace", "--dry-run=server", "-f", "-"], Some(&pruned_role(json!(["a-tls"]))))
                .await?;
            ensure!(narrowed.success, "narrowing its Role in a labelled namespace: {}", narrowed.describe());
            for what in ["role", "rolebinding"] {
                let out = attempt(on.to_owned(), owned(&["delete", what, "sidecert-s9-prune", "--dry-run=server"])).await?;
                ensure!(out.success, "deleting its {what} in a labelled namespace: {}", out.describe());
            }
                Ok(())
            },
        )
        .await
}

/// Whether any rule of the Ingress has the HTTP-01 path.
fn has_challenge_path(ingress: &Ingress) -> bool {
    ingress
        .spec
        .iter()
        .flat_map(|s| s.rules.iter().flatten())
        .flat_map(|r| r.http.iter().flat_map(|h| &h.paths))
        .any(|p| p.path.as_deref() == Some(ACME_CHALLENGE_PATH))
}

/// Scenario 8: Ingresses sidecert cannot serve (wildcard host, TLS entry without secretName,
/// a secretName that is another team's Secret): admitted, with warnings that `kubectl`
/// prints; the other team's Secret is never written, and the reconciler says so in an Event.
async fn s8_warnings(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(&[("e2e-s8", true), ("e2e-s8-b", true)], |namespaces| async move {
            let ns = &namespaces[0];
            let other = &namespaces[1];
            let shared = host("shared", ns);
            let wildcard = format!("*.wild.{}.sidecert.test", ns.name());
            let plain = host("nosecret", ns);
            let theirs = host("theirs", ns);
            // Another team's Secret, which an Ingress author names as its secretName.
            ctx.kubectl_ok(
                &["-n", ns.name(), "create", "secret", "generic", "team-db", "--from-literal=password=hunter2"],
                None,
            )
            .await?;
            let team_db_version = ns.api::<Secret>().get("team-db").await?.metadata.resource_version;
            let ingress = |name: &str, tls: Value, host: &str| {
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                       "metadata": {"name": name, "annotations": {annotations::ISSUE_TEMPORARY_CERTIFICATE: "true"}},
                       "spec": {"tls": [tls], "rules": [{"host": host, "http": {"paths": [{"path": "/",
                                "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}})
            };
            let list = json!({"apiVersion": "v1", "kind": "List", "items": [
                ingress("wildcard", json!({"hosts": [wildcard], "secretName": "wild-tls"}), &wildcard),
                ingress("nosecret", json!({"hosts": [plain]}), &plain),
                ingress("theirs", json!({"hosts": [theirs], "secretName": "team-db"}), &theirs),
                ingress("shared", json!({"hosts": [shared], "secretName": "shared-tls"}), &shared),
            ]});
            let out = ctx
                .kubectl_ok(&["-n", ns.name(), "apply", "-f", "-"], Some(&list.to_string()))
                .await?;
            eprintln!("scenario 8: kubectl printed:\n{}", out.stderr.trim());
            let warnings: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("Warning: ")).collect();
            ensure!(
                warnings.iter().any(|w| w.contains("wildcard") && w.contains(&wildcard)),
                "no warning about the wildcard host in kubectl's output: {warnings:?}"
            );
            ensure!(
                warnings.iter().any(|w| w.contains("secretName")),
                "no warning about the missing secretName in kubectl's output: {warnings:?}"
            );
            let ingresses = ns.api::<Ingress>();
            ensure!(ingresses.get_opt("wildcard").await?.is_some(), "Ingress wildcard not admitted");
            ensure!(ingresses.get_opt("nosecret").await?.is_some(), "Ingress nosecret not admitted");
            ensure!(
                ns.api::<Secret>().get_opt("wild-tls").await?.is_none(),
                "a Secret was made for a wildcard host"
            );

            // Another team's Secret: a warning, no HTTP-01 path, and the Secret untouched,
            // by admission and by the reconciler, which records an Event on the Ingress.
            ensure!(
                warnings.iter().any(|w| w.contains("Secret") && w.contains("team-db") && w.contains("is not sidecert's")),
                "no warning about the Secret of another team in kubectl's output: {warnings:?}"
            );
            wait_for(Duration::from_secs(30), || async {
                let events = events_with_reason(&ctx.client, ns.name(), "SecretNotOurs").await.ok()?;
                events.iter().any(|m| m.contains("team-db")).then_some(())
            })
            .await
            .context("no SecretNotOurs Event from the reconciler for the Ingress naming team-db")?;
            let routed = has_challenge_path(&ingresses.get("theirs").await?);
            ensure!(!routed, "the Ingress naming another team's Secret got an HTTP-01 path");
            let team_db = ns.api::<Secret>().get("team-db").await?;
            ensure!(
                team_db.metadata.resource_version == team_db_version,
                "another team's Secret was written: {:?}",
                team_db.metadata
            );

            // One owner per host: the second namespace asks for the first's host and gets a
            // warning, no path, no Secret, and an Event from the reconciler.
            let steal = ingress("steal", json!({"hosts": [shared], "secretName": "steal-tls"}), &shared);
            let out = ctx
                .kubectl_ok(&["-n", other.name(), "apply", "-f", "-"], Some(&steal.to_string()))
                .await?;
            ensure!(
                out.stderr.contains("claimed by another namespace"),
                "no warning about the host another namespace claimed: {}",
                out.stderr
            );
            ensure!(
                other.api::<Secret>().get_opt("steal-tls").await?.is_none(),
                "a temporary Secret was made for another namespace's host"
            );
            wait_for(Duration::from_secs(30), || async {
                let events = events_with_reason(&ctx.client, other.name(), "HostNotOwned").await.ok()?;
                events.iter().any(|m| m.contains(&shared)).then_some(())
            })
            .await
            .context("no HostNotOwned Event from the reconciler for the Ingress asking for a claimed host")?;
            let routed = has_challenge_path(&other.api::<Ingress>().get("steal").await?);
            ensure!(!routed, "the Ingress asking for another namespace's host got an HTTP-01 path");
            ensure!(
                ctx.claim_holder(&shared).await?.as_deref() == Some(ns.name()),
                "the claim of {shared} moved"
            );
            // Traefik merges both namespaces' rules for the host; what it serves for it is the
            // owner's certificate (the other namespace got no Secret to offer).
            let owners = ns.api::<Secret>().get("shared-tls").await?;
            let owners = check_chain(&tls_crt(&owners).context("shared-tls without tls.crt")?, None)?;
            wait_served(
                ctx.plane,
                &shared,
                Expect::certificate(&owners.serial),
                Instant::now(),
                Duration::from_secs(20),
            )
            .await
            .context("the ingress does not serve the owning namespace's certificate for the shared host")?;
            Ok(())
        })
        .await
}

/// Scenario 6: `helm upgrade` to a new sidecar memory limit while a loop creates Pods (behind an
/// annotated Ingress, so each is injected): no admission fails, and Pods created once the
/// rollout is over carry the new limit.
async fn s6_upgrade(ctx: Ctx) -> Result<()> {
    const OLD_LIMIT: &str = "64Mi";
    const NEW_LIMIT: &str = "96Mi";
    ctx.clone()
        .in_namespaces(&[("e2e-s6", true)], |namespaces| async move {
            let ns = &namespaces[0];
            // Service + Ingress select the loop's Pods; a Deployment of 0 keeps the shape.
            let hosts = vec![host("loop", ns)];
            let manifest = web_app("loop", &hosts, "loop-tls", 0, json!({}), json!({}));
            ctx.kubectl_ok(
                &["-n", ns.name(), "apply", "-f", "-"],
                Some(&manifest.to_string()),
            )
            .await?;
            let pods_api: Api<Pod> = ns.api();
            // The webhooks match Pods to Ingresses from their watch caches, which see the
            // Ingress a moment after `kubectl apply` returns: retry until a Pod is injected.
            let before = create_until(
                &pods_api,
                "before",
                Duration::from_secs(20),
                |name| {
                    serde_json::from_value(app_pod(name, json!({"app": "loop"}), json!({}))).expect("a Pod")
                },
                |p| sidecar(p).is_some(),
            )
            .await
            .context("no Pod behind the annotated Ingress was injected")?;
            let limit = |pod: &Pod| {
                sidecar(pod)
                    .and_then(|c| c.resources.as_ref())
                    .and_then(|r| r.limits.as_ref())
                    .and_then(|l| l.get("memory"))
                    .map(|q| q.0.clone())
            };
            ensure!(
                limit(&before).as_deref() == Some(OLD_LIMIT),
                "before the upgrade: sidecar memory limit {:?}, want {OLD_LIMIT}",
                limit(&before)
            );

            // The loop: one Pod every 200 ms, each deleted again at once.
            let stop = Arc::new(AtomicBool::new(false));
            let creator = {
                let pods_api = pods_api.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut results: Vec<(String, Result<bool, String>)> = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let name = format!("loop-{i}");
                        let pod: Pod =
                            serde_json::from_value(app_pod(&name, json!({"app": "loop"}), json!({})))
                                .expect("Pod");
                        let outcome = match pods_api.create(&PostParams::default(), &pod).await {
                            Ok(created) => {
                                let _ = pods_api
                                    .delete(&name, &DeleteParams::default().grace_period(0))
                                    .await;
                                Ok(sidecar(&created).is_some())
                            }
                            Err(e) => {
                                // At once, with the time: a CI log cut short still shows why.
                                eprintln!(
                                    "scenario 6: {name} refused at unix {:.3}: {e}",
                                    SystemTime::now()
                                        .duration_since(UNIX_EPOCH)
                                        .map(|d| d.as_secs_f64())
                                        .unwrap_or_default()
                                );
                                Err(e.to_string())
                            }
                        };
                        results.push((name, outcome));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    results
                })
            };

            tokio::time::sleep(Duration::from_secs(1)).await;
            let upgrade = ctx
                .helm_ok(&[
                    "upgrade",
                    RELEASE,
                    CHART,
                    "-n",
                    &ctx.release_ns,
                    "--reuse-values",
                    "--set",
                    &format!("sidecar.resources.limits.memory={NEW_LIMIT}"),
                    "--wait",
                    "--timeout",
                    "120s",
                ])
                .await;
            // Over when only new webhook Pods are left (the old ones have terminated).
            let rolled = match &upgrade {
                Ok(_) => {
                    ctx.rolled_to(&format!("--sidecar-memory-limit={NEW_LIMIT}"))
                        .await
                }
                Err(_) => Ok(()),
            };
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop.store(true, Ordering::Relaxed);
            let results = creator.await?;
            upgrade.context("helm upgrade")?;
            rolled?;

            let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
            let uninjected: Vec<_> = results.iter().filter(|(_, r)| matches!(r, Ok(false))).collect();
            eprintln!(
                "scenario 6: {} Pods created during the upgrade, {} refused, {} without sidecar",
                results.len(),
                failed.len(),
                uninjected.len()
            );
            ensure!(
                results.len() >= 10,
                "only {} Pods were created during the upgrade",
                results.len()
            );
            ensure!(
                failed.is_empty(),
                "admissions failed during the upgrade: {failed:?}"
            );
            ensure!(
                uninjected.is_empty(),
                "Pods admitted without the sidecar: {uninjected:?}"
            );

            for i in 0..3 {
                let name = format!("after-{i}");
                let pod: Pod = serde_json::from_value(app_pod(&name, json!({"app": "loop"}), json!({})))?;
                let created = pods_api.create(&PostParams::default(), &pod).await?;
                ensure!(
                    limit(&created).as_deref() == Some(NEW_LIMIT),
                    "Pod {name} created after the upgrade: sidecar memory limit {:?}, want {NEW_LIMIT}",
                    limit(&created)
                );
            }
            Ok(())
        })
        .await
}

/// Scenario 7: With no webhook Pod left, Pods in labelled namespaces are refused with a message that
/// names the webhook (failurePolicy Fail); other namespaces are unaffected; once the
/// webhook is back, Pods are admitted again.
async fn s7_webhook_down(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(
            &[("e2e-s7", true), ("e2e-s7-off", false)],
            |namespaces| async move {
                let (on, off) = (&namespaces[0], &namespaces[1]);
                let deployment = format!("deployment/{}", ctx.webhook_deployment());
                let webhook_pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.release_ns);
                let selector = "app.kubernetes.io/component=webhook";

                ctx.kubectl_ok(
                    &["-n", &ctx.release_ns, "scale", &deployment, "--replicas=0"],
                    None,
                )
                .await?;
                let result = async {
                    wait_for(Duration::from_secs(60), || {
                        let webhook_pods = webhook_pods.clone();
                        async move {
                            let pods = webhook_pods
                                .list(&ListParams::default().labels(selector))
                                .await
                                .ok()?;
                            pods.items.is_empty().then_some(())
                        }
                    })
                    .await
                    .context("webhook Pods still there 60 s after scaling to 0")?;

                    let pod = app_pod("refused", json!({"app": "probe"}), json!({})).to_string();
                    let out = ctx
                        .kubectl(&["-n", on.name(), "create", "-f", "-"], Some(&pod))
                        .await?;
                    ensure!(
                        !out.success,
                        "a Pod was admitted in a labelled namespace with no webhook running"
                    );
                    eprintln!("scenario 7: kubectl printed: {}", out.stderr.trim());
                    ensure!(
                        out.stderr.contains("failed calling webhook \"pods.sidecert.io\""),
                        "refusal does not name the webhook: {}",
                        out.stderr.trim()
                    );
                    ensure!(
                        on.api::<Pod>().get_opt("refused").await?.is_none(),
                        "the refused Pod exists"
                    );
                    let pod = app_pod("unaffected", json!({"app": "probe"}), json!({})).to_string();
                    ctx.kubectl_ok(&["-n", off.name(), "create", "-f", "-"], Some(&pod))
                        .await
                        .context("a Pod in an unlabelled namespace was refused while the webhook is down")?;
                    Ok(())
                }
                .await;

                // Back, whatever happened above.
                ctx.kubectl_ok(
                    &["-n", &ctx.release_ns, "scale", &deployment, "--replicas=2"],
                    None,
                )
                .await?;
                result?;
                ctx.kubectl_ok(
                    &[
                        "-n",
                        &ctx.release_ns,
                        "rollout",
                        "status",
                        &deployment,
                        "--timeout=90s",
                    ],
                    None,
                )
                .await?;
                // The API server learns the new endpoints through its informer: allow a moment.
                let pod = app_pod(
                    "admitted",
                    json!({"app": "admitted"}),
                    direct_annotations(&host("admitted", on), "admitted-tls"),
                )
                .to_string();
                let started = Instant::now();
                let admitted = wait_for(Duration::from_secs(30), || {
                    let ctx = ctx.clone();
                    let pod = pod.clone();
                    let ns = on.name().to_owned();
                    async move {
                        ctx.kubectl(&["-n", &ns, "create", "-f", "-"], Some(&pod))
                            .await
                            .ok()
                            .filter(|o| o.success)
                    }
                })
                .await
                .context("Pods still refused 30 s after the webhook rollout finished")?;
                eprintln!(
                    "scenario 7: admitted again {:.1}s after the rollout: {}",
                    started.elapsed().as_secs_f32(),
                    admitted.stdout.trim()
                );
                let pod = on.api::<Pod>().get("admitted").await?;
                ensure!(
                    sidecar(&pod).is_some(),
                    "the Pod admitted after the outage has no sidecar"
                );
                Ok(())
            },
        )
        .await
}

/// Scenario 12: `helm upgrade` to strict RBAC (`rbac.namespaces` lists one of two labelled
/// namespaces). The API server refuses the webhook's ServiceAccount every namespaced write and
/// read outside the one listed (RBAC, not the policy: the unlisted namespace is labelled),
/// and allows them in it; an Ingress there gets its certificate issued as before, one in the
/// unlisted namespace gets nothing. The release goes back to the label-driven default after.
async fn s12_strict_rbac(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(
            &[("e2e-s12", true), ("e2e-s12-unlisted", true)],
            |namespaces| async move {
                let (listed, unlisted) = (&namespaces[0], &namespaces[1]);
                let upgrade = |namespaces: String| {
                    let ctx = ctx.clone();
                    async move {
                        ctx.helm_ok(&[
                            "upgrade",
                            RELEASE,
                            CHART,
                            "-n",
                            &ctx.release_ns,
                            "--reuse-values",
                            "--set-json",
                            &format!("rbac.namespaces={namespaces}"),
                            "--wait",
                            "--timeout",
                            "120s",
                        ])
                        .await
                        .context("helm upgrade")
                    }
                };
                let strict_selector = format!(
                    "--reconcile-namespace-selector=sidecert.io/injection=enabled,kubernetes.io/metadata.name in ({})",
                    listed.name()
                );
                upgrade(json!([listed.name()]).to_string()).await?;
                let result = async {
                    // The old Pods (the default selector) would still serve the unlisted one.
                    ctx.rolled_to(&strict_selector).await?;
                    strict_rbac_holds(&ctx, listed, unlisted).await
                }
                .await;
                let restored = async {
                    upgrade("[]".to_owned()).await?;
                    ctx.rolled_to("--reconcile-namespace-selector=sidecert.io/injection=enabled")
                        .await
                }
                .await
                .context("back to the default RBAC");
                result.and(restored)
            },
        )
        .await
}

/// Scenario 12, under strict RBAC: what the webhook may do, and that it still works.
async fn strict_rbac_holds(ctx: &Ctx, listed: &TestNamespace, unlisted: &TestNamespace) -> Result<()> {
    let as_webhook = format!(
        "--as=system:serviceaccount:{}:{}",
        ctx.release_ns,
        ctx.webhook_deployment()
    );
    let can_i = |ns: &str, verb: &str, what: &str| {
        let (ns, verb, what) = (ns.to_owned(), verb.to_owned(), what.to_owned());
        let as_webhook = as_webhook.clone();
        async move {
            let scope = if ns.is_empty() {
                "--all-namespaces".to_owned()
            } else {
                format!("--namespace={ns}")
            };
            let out = ctx
                .kubectl(&["auth", "can-i", &as_webhook, &scope, &verb, &what], None)
                .await?;
            Ok::<_, anyhow::Error>(out.stdout.trim() == "yes")
        }
    };
    let expect = [
        (listed.name(), "create", "secrets", true),
        (listed.name(), "create", "roles", true),
        (listed.name(), "create", "leases", true),
        (unlisted.name(), "create", "secrets", false),
        (unlisted.name(), "get", "secrets", false),
        (unlisted.name(), "create", "roles", false),
        (unlisted.name(), "create", "rolebindings", false),
        (unlisted.name(), "patch", "deployments", false),
        (unlisted.name(), "patch", "ingresses", false),
        ("kube-system", "create", "secrets", false),
        ("kube-system", "patch", "daemonsets", false),
        ("", "list", "secrets", false),
        ("", "list", "roles", false),
        ("", "list", "pods", false),
        (listed.name(), "list", "pods", true),
        // What stays cluster-wide: reads of what decides what sidecert does.
        ("", "watch", "ingresses", true),
        ("", "watch", "services", true),
        ("", "watch", "namespaces", true),
    ];
    for (ns, verb, what, want) in expect {
        let got = can_i(ns, verb, what).await?;
        ensure!(
            got == want,
            "as the webhook, `kubectl auth can-i {verb} {what}` in {:?}: {got}, want {want}",
            if ns.is_empty() { "every namespace" } else { ns }
        );
    }
    // The write itself, refused by RBAC (the namespace is labelled: the policy would allow a
    // temporary TLS Secret there).
    let temporary = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "s12-temporary",
            "labels": {"app.kubernetes.io/managed-by": "sidecert"},
            "annotations": {"sidecert.io/temporary": "true"}},
        "data": {"tls.crt": "", "tls.key": ""}
    })
    .to_string();
    for ns in [unlisted.name(), "kube-system"] {
        let out = ctx
            .kubectl(
                &[&as_webhook, "-n", ns, "create", "--dry-run=server", "-f", "-"],
                Some(&temporary),
            )
            .await?;
        ensure!(
            !out.success && out.stderr.contains("forbidden"),
            "a temporary TLS Secret in {ns} as the webhook: {}",
            out.describe()
        );
    }
    let out = ctx
        .kubectl(
            &[
                &as_webhook,
                "-n",
                listed.name(),
                "create",
                "--dry-run=server",
                "-f",
                "-",
            ],
            Some(&temporary),
        )
        .await?;
    ensure!(
        out.success,
        "a temporary TLS Secret in the listed namespace: {}",
        out.describe()
    );

    // It still does its work where it may, and nothing where it may not.
    for ns in [listed, unlisted] {
        let manifest = web_app("web", &[host("web", ns)], "web-tls", 1, json!({}), json!({}));
        ctx.kubectl_ok(
            &["-n", ns.name(), "apply", "-f", "-"],
            Some(&manifest.to_string()),
        )
        .await?;
    }
    let secrets: Api<Secret> = listed.api();
    let issued = wait_issued(&secrets, "web-tls", Duration::from_secs(90)).await?;
    check_issued(ctx.plane, &issued, &[host("web", listed)]).await?;
    let pods: Api<Pod> = unlisted.api();
    let running = running_pods(&pods, "app=web", 1, Duration::from_secs(60)).await?;
    ensure!(
        running.iter().all(|p| sidecar(p).is_none()),
        "a Pod in the labelled but unlisted namespace got the sidecar"
    );
    ensure!(
        unlisted.api::<Secret>().get_opt("web-tls").await?.is_none(),
        "the unlisted namespace got a temporary Secret"
    );
    let ingress = unlisted.api::<Ingress>().get("web").await?;
    ensure!(
        !has_challenge_path(&ingress),
        "the Ingress in the unlisted namespace got an HTTP-01 path"
    );
    ensure!(
        ctx.claim_holder(&host("web", unlisted)).await?.is_none(),
        "the unlisted namespace claimed its host"
    );
    Ok(())
}

/// A Gateway API object of `kind`, in `ns`, from its JSON.
async fn apply_gateway_api(ctx: &Ctx, ns: &str, manifest: &Value) -> Result<()> {
    ctx.kubectl_ok(&["-n", ns, "apply", "-f", "-"], Some(&manifest.to_string()))
        .await
        .map(drop)
}

fn gateway_objects(ctx: &Ctx, ns: &str, kind: &str) -> Api<kube::api::DynamicObject> {
    Api::namespaced_with(ctx.client.clone(), ns, &sidecert_e2e::dns::gateway_api(kind))
}

/// Waits until an Event of `reason` about the object `name` is in `ns`; its message.
async fn wait_event(ctx: &Ctx, ns: &str, name: &str, reason: &str) -> Result<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(ctx.client.clone(), ns);
    wait_for(Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .map(|e| e.note.unwrap_or_default())
    })
    .await
    .with_context(|| format!("no {reason} Event about {name} in {ns}"))
}

/// Scenario 13: Gateway API. A Gateway with HTTP and HTTPS listeners, an HTTPRoute and a
/// Deployment in one `kubectl apply`: HTTPS through Traefik's Gateway with the temporary
/// certificate at once, then the Pebble-issued one, one order; the same for a ListenerSet
/// attached to a Gateway in another namespace (Traefik v3.7 does not serve ListenerSets, so
/// only its HTTP-01 challenge goes through Traefik, by the Gateway's HTTP listener); each
/// misconfiguration is an Event; without the annotation sidecert's HTTPRoute and solver
/// Service go and the Secret stays.
async fn s13_gateway(ctx: Ctx) -> Result<()> {
    ctx.clone()
        .in_namespaces(
            &[("e2e-s13", true), ("e2e-s13-infra", false), ("e2e-s13-other", true)],
            |namespaces| async move {
                let (ns, infra, other) = (&namespaces[0], &namespaces[1], &namespaces[2]);
                let class = std::env::var("GATEWAY_CLASS").unwrap_or_else(|_| "traefik".into());
                let (http_port, https_port) = (ctx.plane.ingress_http().port(), ctx.plane.ingress_https().port());
                let host = host("gw", ns);
                let switch = json!({annotations::ISSUE_TEMPORARY_CERTIFICATE: "true"});
                let gateway = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "metadata": {"name": "edge", "annotations": switch},
                    "spec": {"gatewayClassName": class, "listeners": [
                        {"name": "http", "protocol": "HTTP", "port": http_port, "hostname": host},
                        {"name": "https", "protocol": "HTTPS", "port": https_port, "hostname": host,
                         "tls": {"mode": "Terminate", "certificateRefs": [{"name": "web-tls"}]}}]}});
                let http_route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": "web"},
                    "spec": {"parentRefs": [{"name": "edge", "sectionName": "https"}], "hostnames": [host],
                             "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}});
                let secrets: Api<Secret> = ns.api();
                let (applied, temporary) =
                    apply_gateway_app(&ctx, ns, ("web", 2), &host, "web-tls", [gateway, http_route], "Gateway")
                        .await?;
                let temp_info = check_chain(&tls_crt(&temporary).context("no tls.crt")?, None)?;
                let (temporary_after, _) = wait_served(
                    ctx.plane,
                    &host,
                    Expect::certificate(&temp_info.serial),
                    applied,
                    Duration::from_secs(30),
                )
                .await?;
                eprintln!(
                    "scenario 13: apply -> https://{host}/ through the Gateway with the temporary certificate: {:.1} s",
                    temporary_after.as_secs_f64()
                );

                // sidecert's HTTPRoute: to the HTTP listener by sectionName, for the host.
                let routes = gateway_objects(&ctx, ns.name(), "HTTPRoute");
                let solver_route = "gw.edge.web-sidecert-solver";
                let route = wait_for(Duration::from_secs(20), || async {
                    routes.get_opt(solver_route).await.ok().flatten()
                })
                .await
                .with_context(|| format!("no HTTPRoute {solver_route}"))?;
                ensure!(
                    route.data["spec"]["parentRefs"]
                        == json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge",
                                    "sectionName": "http"}]),
                    "solver route parentRefs {}",
                    route.data["spec"]["parentRefs"]
                );
                ensure!(route.data["spec"]["hostnames"] == json!([host]), "solver route hostnames");
                let solver = format!("web{SOLVER_SERVICE_SUFFIX}");
                ns.api::<Service>()
                    .get_opt(&solver)
                    .await?
                    .with_context(|| format!("no solver Service {solver}"))?;

                // Every Pod gets the sidecar (at creation, or through one rollout restart).
                let pods_api: Api<Pod> = ns.api();
                wait_for(Duration::from_secs(90), || async {
                    let pods = running_pods(&pods_api, "app=web", 2, Duration::from_secs(5)).await.ok()?;
                    pods.iter().all(|p| sidecar(p).is_some()).then_some(())
                })
                .await
                .context("the Pods behind the HTTPRoute did not all get the sidecar")?;

                let issued = wait_issued(&secrets, "web-tls", Duration::from_secs(90)).await?;
                let info = check_issued(ctx.plane, &issued, std::slice::from_ref(&host)).await?;
                let root = ctx.plane.pebble_root_pem().await?;
                let (issued_after, _) = wait_served(
                    ctx.plane,
                    &host,
                    Expect::issued(&info.serial, &root),
                    applied,
                    Duration::from_secs(30),
                )
                .await?;
                eprintln!(
                    "scenario 13: apply -> https://{host}/ through the Gateway with the issued certificate: {:.1} s",
                    issued_after.as_secs_f64()
                );
                let tokens = pebble_tokens(ctx.plane, &host);
                ensure!(tokens.len() == 1, "Pebble validated {} challenges for {host}", tokens.len());
                // Injected at creation (the live re-check reads the Gateway and its route when
                // the caches lag), or else through one rollout restart: say which.
                let restarts = events_with_reason(&ctx.client, ns.name(), "RolloutRestart").await?;
                eprintln!("scenario 13: rollout restarts for the Gateway's Pods: {}", restarts.len());
                let pods = pods_api.list(&ListParams::default().labels("app=web")).await?.items;
                let running: Vec<Pod> = pods.into_iter().filter(is_running).collect();
                let orders = sidecar_metric_sum(&running, "sidecert_orders_total", "").await?;
                ensure!(orders <= 1.0, "the sidecars made {orders} orders, want one");

                // A deleted solver route comes back (the reconciler), as sidecert's.
                routes.delete(solver_route, &DeleteParams::default()).await?;
                wait_for(Duration::from_secs(20), || async {
                    let r = routes.get_opt(solver_route).await.ok()??;
                    (r.metadata.deletion_timestamp.is_none() && r.metadata.uid != route.metadata.uid).then_some(())
                })
                .await
                .context("the deleted solver HTTPRoute did not come back")?;

                listener_set(&ctx, ns, infra).await?;
                misconfigurations(&ctx, ns, other, &host).await?;

                // Without the annotation: sidecert's route and solver Service go, the Secret stays.
                ctx.kubectl_ok(
                    &["-n", ns.name(), "annotate", "gateway", "edge", &format!("{}-", annotations::ISSUE_TEMPORARY_CERTIFICATE)],
                    None,
                )
                .await?;
                wait_for(Duration::from_secs(20), || async {
                    let route = routes.get_opt(solver_route).await.ok()?;
                    let svc = ns.api::<Service>().get_opt(&solver).await.ok()?;
                    (route.is_none() && svc.is_none()).then_some(())
                })
                .await
                .context("sidecert's HTTPRoute and solver Service outlived the annotation")?;
                let kept = secrets.get("web-tls").await?;
                ensure!(tls_crt(&kept) == tls_crt(&issued), "the issued Secret changed after the annotation went");
                wait_event(&ctx, ns.name(), "edge", "ChallengeRouteRemoved").await?;
                Ok(())
            },
        )
        .await
}

/// `web_app`'s Service and Deployment of (`app`, `replicas`) for `host` with the Gateway API
/// `objects` before the Deployment (as a user's one file would have them), in one `kubectl
/// apply`; then the temporary Secret `secret` of the `what`'s listener, within 10 s. When it
/// was applied, and that Secret.
async fn apply_gateway_app(
    ctx: &Ctx,
    ns: &TestNamespace,
    (app, replicas): (&str, u32),
    host: &str,
    secret: &str,
    objects: [Value; 2],
    what: &str,
) -> Result<(Instant, Secret)> {
    let mut manifest = web_app(app, &[host.to_owned()], secret, replicas, json!({}), json!({}));
    let items = manifest["items"]
        .as_array_mut()
        .context("web_app's List has no items")?;
    // web_app's Ingress goes: the Gateway API objects stand in for it.
    items.retain(|i| i["kind"] != "Ingress");
    for (i, object) in objects.into_iter().enumerate() {
        items.insert(1 + i, object);
    }
    let applied = Instant::now();
    ctx.kubectl_ok(
        &["-n", ns.name(), "apply", "-f", "-"],
        Some(&manifest.to_string()),
    )
    .await?;
    let secrets: Api<Secret> = ns.api();
    let temporary = wait_for(Duration::from_secs(10), || async {
        secrets.get_opt(secret).await.ok().flatten()
    })
    .await
    .with_context(|| {
        format!("no temporary Secret {secret} for the {what}'s listener within 10 s of the apply")
    })?;
    ensure!(
        annotation(&temporary, annotations::TEMPORARY) == Some("true"),
        "{secret} is not the temporary certificate"
    );
    eprintln!(
        "scenario 13: apply -> temporary Secret of the {what}'s listener: {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    Ok((applied, temporary))
}

/// Scenario 13, continued: a ListenerSet in `ns` attached to a Gateway in `infra` (which
/// admits ListenerSets and routes from every namespace on its HTTP listener).
async fn listener_set(ctx: &Ctx, ns: &TestNamespace, infra: &TestNamespace) -> Result<()> {
    let class = std::env::var("GATEWAY_CLASS").unwrap_or_else(|_| "traefik".into());
    let http_port = ctx.plane.ingress_http().port();
    let https_port = ctx.plane.ingress_https().port();
    apply_gateway_api(
        ctx,
        infra.name(),
        &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "shared"},
            "spec": {"gatewayClassName": class,
                     "allowedListeners": {"namespaces": {"from": "All"}},
                     "listeners": [{"name": "http", "protocol": "HTTP", "port": http_port,
                                    "allowedRoutes": {"namespaces": {"from": "All"}}}]}}),
    )
    .await?;
    let host = host("ls", ns);
    let listener_set = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "ListenerSet",
        "metadata": {"name": "api", "annotations": {annotations::ISSUE_TEMPORARY_CERTIFICATE: "true"}},
        "spec": {"parentRef": {"name": "shared", "namespace": infra.name()},
                 "listeners": [{"name": "https", "protocol": "HTTPS", "port": https_port, "hostname": host,
                                "tls": {"mode": "Terminate", "certificateRefs": [{"name": "api-tls"}]}}]}});
    let http_route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "api"},
        "spec": {"parentRefs": [{"kind": "ListenerSet", "name": "api", "sectionName": "https"}],
                 "rules": [{"backendRefs": [{"name": "api", "port": 80}]}]}});
    let secrets: Api<Secret> = ns.api();
    let (applied, _) = apply_gateway_app(
        ctx,
        ns,
        ("api", 1),
        &host,
        "api-tls",
        [listener_set, http_route],
        "ListenerSet",
    )
    .await?;
    let routes = gateway_objects(ctx, ns.name(), "HTTPRoute");
    let route = wait_for(Duration::from_secs(20), || async {
        routes.get_opt("ls.api.api-sidecert-solver").await.ok().flatten()
    })
    .await
    .context("no solver HTTPRoute for the ListenerSet")?;
    ensure!(
        route.data["spec"]["parentRefs"]
            == json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "shared",
                        "namespace": infra.name(), "sectionName": "http"}]),
        "the ListenerSet's solver route attaches to {}",
        route.data["spec"]["parentRefs"]
    );
    let issued = wait_issued(&secrets, "api-tls", Duration::from_secs(90)).await?;
    check_issued(ctx.plane, &issued, std::slice::from_ref(&host)).await?;
    let tokens = pebble_tokens(ctx.plane, &host);
    ensure!(
        tokens.len() == 1,
        "Pebble validated {} challenges for {host}",
        tokens.len()
    );
    eprintln!(
        "scenario 13: apply -> the ListenerSet's certificate issued: {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Scenario 13, continued: every misconfiguration is an Event on its object.
async fn misconfigurations(ctx: &Ctx, ns: &TestNamespace, other: &TestNamespace, owned: &str) -> Result<()> {
    let class = std::env::var("GATEWAY_CLASS").unwrap_or_else(|_| "traefik".into());
    let http_port = ctx.plane.ingress_http().port();
    let https_port = ctx.plane.ingress_https().port();
    let switch = json!({annotations::ISSUE_TEMPORARY_CERTIFICATE: "true"});
    let gateway = |name: &str, listeners: Value| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": name, "annotations": switch},
               "spec": {"gatewayClassName": class, "listeners": listeners}})
    };
    let https = |name: &str, host: &str, cert: Value| {
        json!({"name": name, "protocol": "HTTPS", "port": https_port, "hostname": host,
               "tls": {"mode": "Terminate", "certificateRefs": [cert]}})
    };
    let cases = [
        (
            "no-http",
            "NoHTTPListener",
            json!([https("https", &host("a", ns), json!({"name": "a-tls"}))]),
        ),
        (
            "not-allowed",
            "SolverRouteNotAllowed",
            json!([{"name": "http", "protocol": "HTTP", "port": http_port,
                    "allowedRoutes": {"namespaces": {"from": "Selector",
                        "selector": {"matchLabels": {"sidecert.test/team": "nobody"}}}}},
                   https("https", &host("b", ns), json!({"name": "b-tls"}))]),
        ),
        (
            "cross-ns",
            "CrossNamespaceCertificate",
            json!([{"name": "http", "protocol": "HTTP", "port": http_port},
                   https("https", &host("c", ns), json!({"name": "c-tls", "namespace": other.name()}))]),
        ),
    ];
    for (name, reason, listeners) in &cases {
        apply_gateway_api(ctx, ns.name(), &gateway(name, listeners.clone())).await?;
        let note = wait_event(ctx, ns.name(), name, reason).await?;
        eprintln!("scenario 13: {reason}: {note}");
    }
    // A ListenerSet on a Gateway that admits none (allowedListeners default: None).
    apply_gateway_api(
        ctx,
        ns.name(),
        &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "ListenerSet",
            "metadata": {"name": "refused", "annotations": switch},
            "spec": {"parentRef": {"name": "no-http"},
                     "listeners": [https("https", &host("d", ns), json!({"name": "d-tls"}))]}}),
    )
    .await?;
    wait_event(ctx, ns.name(), "refused", "ListenerSetNotAllowed").await?;
    // A backend in another namespace.
    apply_gateway_api(
        ctx,
        ns.name(),
        &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "elsewhere"},
            "spec": {"parentRefs": [{"name": "no-http"}],
                     "rules": [{"backendRefs": [{"name": "web", "namespace": other.name(), "port": 80}]}]}}),
    )
    .await?;
    wait_event(ctx, ns.name(), "no-http", "BackendInOtherNamespace").await?;
    // A hostname another namespace owns: no temporary Secret, an Event.
    apply_gateway_api(
        ctx,
        other.name(),
        &gateway(
            "taker",
            json!([{"name": "http", "protocol": "HTTP", "port": http_port},
                   https("https", owned, json!({"name": "taken-tls"}))]),
        ),
    )
    .await?;
    wait_event(ctx, other.name(), "taker", "HostNotOwned").await?;
    ensure!(
        other.api::<Secret>().get_opt("taken-tls").await?.is_none(),
        "a temporary Secret was made for a host another namespace owns"
    );
    Ok(())
}
