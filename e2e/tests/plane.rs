//! The local plane, end to end: the controller-manager makes Pods, the scheduler binds them,
//! the kubelet runs them on containerd from the local registry's images, EndpointSlices
//! follow and kube-proxy routes their Service; a container gets its env and a working
//! ServiceAccount token; Pebble issues a certificate over HTTP-01 through challtestsrv's DNS,
//! which plane-dns points at Pods and, for Ingress hosts, at the ingress controller (Traefik).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::Job,
    core::v1::{ConfigMap, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, LogParams, PostParams},
};
use serde_json::json;
use sidecert_e2e::{Plane, TestNamespace, wait_for};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const NODE: &str = "sidecert-local";
/// A challenge path no solver holds a file for.
const PROBE: &str = "/.well-known/acme-challenge/probe";
/// busybox httpd's page for a file it does not have (Traefik's own 404 is `404 page not found`).
const HTTPD_NOT_FOUND: &str = "<TITLE>404 Not Found</TITLE>";

/// Runs `body`; on failure prints the namespace's state; always deletes the namespace.
async fn in_namespace<F, Fut>(prefix: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(&'static Plane, Arc<TestNamespace>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let plane = Plane::get().await.context("local plane")?;
    let ns = Arc::new(plane.namespace(prefix, false).await?);
    let result = body(plane, ns.clone()).await;
    if result.is_err() {
        plane.dump_on_failure(ns.name()).await;
    }
    if let Ok(ns) = Arc::try_unwrap(ns) {
        ns.cleanup().await?;
    }
    result
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_runs_on_the_node_and_its_service_answers() -> anyhow::Result<()> {
    in_namespace("e2e-deploy", |_plane, ns| async move {
        let deployments: Api<Deployment> = ns.api();
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "app", "image": "example/app:1.0",
                                             "ports": [{"containerPort": 8080}],
                                             "readinessProbe": {"httpGet": {"path": "/", "port": 8080},
                                                                "periodSeconds": 1}}]}
                }
            }
        }))?;
        deployments.create(&PostParams::default(), &deployment).await?;
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
        }))?;
        ns.api::<Service>()
            .create(&PostParams::default(), &service)
            .await?;

        let pods: Api<Pod> = ns.api();
        let ips = wait_for(Duration::from_secs(90), || async {
            let list = pods.list(&ListParams::default().labels("app=web")).await.ok()?;
            let running: Vec<&Pod> = list
                .items
                .iter()
                .filter(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE)
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                        && is_ready(p)
                })
                .collect();
            (list.items.len() == 2 && running.len() == 2).then(|| {
                running
                    .iter()
                    .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse::<Ipv4Addr>().ok())
                    .collect::<BTreeSet<_>>()
            })
        })
        .await
        .context("2 Pods bound, Running and Ready")?;
        ensure!(ips.len() == 2, "each Pod has its own IP: {ips:?}");
        for ip in &ips {
            let o = ip.octets();
            ensure!(
                o[..3] == [10, 213, 0] && (10..=250).contains(&o[3]),
                "Pod IP {ip} outside the range"
            );
        }

        let slices: Api<EndpointSlice> = ns.api();
        wait_for(Duration::from_secs(60), || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .ok()?;
            let ready: BTreeSet<Ipv4Addr> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.iter())
                .filter_map(|a| a.parse().ok())
                .collect();
            (ready == ips).then_some(())
        })
        .await
        .context("EndpointSlice lists both Pod IPs, ready")?;

        // kube-proxy routes the Service's ClusterIP to the Pods (from the host, as from a Pod).
        let cluster_ip = ns
            .api::<Service>()
            .get("web")
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("the Service has a ClusterIP")?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let url = format!("http://{cluster_ip}/");
        let body = wait_for(Duration::from_secs(30), || async {
            http.get(&url).send().await.ok()?.text().await.ok()
        })
        .await
        .with_context(|| format!("GET {url} through kube-proxy"))?;
        ensure!(body.contains("sidecert test app"), "the app answered {body:?}");

        deployments.delete("web", &DeleteParams::foreground()).await?;
        wait_for(Duration::from_secs(90), || async {
            let list = pods.list(&ListParams::default().labels("app=web")).await.ok()?;
            list.items.is_empty().then_some(())
        })
        .await
        .context("Pods gone after the Deployment is deleted")?;
        Ok(())
    })
    .await
}

/// A Job whose container is a shell script: it checks its env (downward API, Secret,
/// ConfigMap, `$(VAR)`, the `kubernetes` Service), its network and its mounted
/// ServiceAccount token, and exits 0, so the Job completes. The test then reads the token
/// from the container's log (through the API server and the kubelet) and checks the API
/// server authenticates it as the namespace's default ServiceAccount, with no rights (403).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_container_gets_env_network_and_token() -> anyhow::Result<()> {
    in_namespace("e2e-job", |plane, ns| async move {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}
        }))?;
        ns.api::<Secret>().create(&PostParams::default(), &secret).await?;
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "settings"}, "data": {"greeting": "hello"}
        }))?;
        ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await?;
        let kubernetes = Api::<Service>::namespaced(plane.client().await?, "default")
            .get("kubernetes")
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("the kubernetes Service has a ClusterIP")?;
        let script = r#"set -eu
echo "pod $POD_NAME ip $POD_IP"
ip -4 addr show eth0 | grep -q "inet $POD_IP/"
test "$PASSWORD" = hunter2
test "$MSG" = "hello world"
test "$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT" = "$API"
sa=/var/run/secrets/kubernetes.io/serviceaccount
test "$(cat $sa/namespace)" = "$NS"
grep -q 'BEGIN CERTIFICATE' $sa/ca.crt
echo "token $(cat $sa/token)"
echo all-checks-passed"#;
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "check"},
            "spec": {
                "backoffLimit": 0,
                "template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "check", "image": "example/app:1.0",
                        "command": ["sh", "-c", script],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                            {"name": "MSG", "value": "$(GREETING) world"},
                            {"name": "API", "value": format!("{kubernetes}:443")}
                        ]
                    }]
                }}
            }
        }))?;
        let jobs: Api<Job> = ns.api();
        jobs.create(&PostParams::default(), &job).await?;
        let outcome = wait_for(Duration::from_secs(90), || async {
            let status = jobs.get("check").await.ok()?.status?;
            if status.succeeded.unwrap_or(0) >= 1 {
                Some(Ok(()))
            } else if status.failed.unwrap_or(0) >= 1 {
                Some(Err(()))
            } else {
                None
            }
        })
        .await
        .context("Job finished")?;
        if outcome.is_err() {
            bail!("the Job's Pod failed (see the dump for its log)");
        }
        let pods: Api<Pod> = ns.api();
        let pod = pods
            .list(&ListParams::default().labels("job-name=check"))
            .await?
            .items
            .into_iter()
            .next()
            .and_then(|p| p.metadata.name)
            .context("the Job's Pod")?;
        let log = pods.logs(&pod, &LogParams::default()).await?;
        ensure!(log.contains("all-checks-passed"), "container log: {log}");
        let token = log
            .lines()
            .find_map(|l| l.strip_prefix("token "))
            .context("the token line in the log")?
            .trim()
            .to_owned();
        // The mounted token is a real, bound ServiceAccount token: the API server knows who
        // it is and grants it nothing.
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
                plane.repo_root().join("e2e/.state/pki/ca.crt"),
            )?)?)
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let api = format!("https://{}:6443", plane.gateway());
        let review: serde_json::Value = http
            .post(format!("{api}/apis/authentication.k8s.io/v1/selfsubjectreviews"))
            .bearer_auth(&token)
            .json(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let user = review["status"]["userInfo"]["username"].as_str().unwrap_or_default();
        ensure!(
            user == format!("system:serviceaccount:{}:default", ns.name()),
            "the token authenticates as {user:?}"
        );
        let code = http
            .get(format!("{api}/api/v1/namespaces/{}/secrets", ns.name()))
            .bearer_auth(&token)
            .send()
            .await?
            .status();
        ensure!(code == reqwest::StatusCode::FORBIDDEN, "listing Secrets with the token: {code}");
        Ok(())
    })
    .await
}

/// Serves `/.well-known/acme-challenge/<token>` from `tokens` on `addr`.
async fn http01_responder(
    addr: (Ipv4Addr, u16),
    tokens: Arc<Mutex<HashMap<String, String>>>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr:?}"))?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or_default();
                let body = path
                    .strip_prefix("/.well-known/acme-challenge/")
                    .and_then(|t| tokens.lock().ok()?.get(t).cloned());
                let response = match body {
                    Some(b) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                        b.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
                    }
                };
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Orders a certificate for `name` from Pebble, publishing each HTTP-01 key authorization
/// with `publish(token, key_authorization)`; checks the chain ends at Pebble's root.
async fn issue_and_check(
    plane: &Plane,
    name: &str,
    mut publish: impl FnMut(&str, &str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (account, _credentials) = Account::builder_with_root(plane.pebble_ca_file())?
        .create(
            &NewAccount {
                contact: &[],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            plane.pebble_directory().to_owned(),
            None,
        )
        .await?;
    let identifiers = [Identifier::Dns(name.to_owned())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        if authz.status == AuthorizationStatus::Valid {
            continue;
        }
        let mut challenge = authz
            .challenge(ChallengeType::Http01)
            .context("Pebble offers no http-01 challenge")?;
        publish(&challenge.token, challenge.key_authorization().as_str())?;
        challenge.set_ready().await?;
    }
    let retry = RetryPolicy::new().timeout(Duration::from_secs(60));
    let status = order.poll_ready(&retry).await?;
    ensure!(status == OrderStatus::Ready, "order status {status:?}");
    let _key_pem = order.finalize().await?;
    let chain_pem = order.poll_certificate(&retry).await?;

    let chain: Vec<_> =
        x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    ensure!(
        chain.len() >= 2,
        "leaf and at least one intermediate, got {}",
        chain.len()
    );
    let certs = chain
        .iter()
        .map(|p| p.parse_x509())
        .collect::<Result<Vec<_>, _>>()?;
    let leaf_names: Vec<String> = certs[0]
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
    ensure!(
        leaf_names.iter().any(|n| n == name),
        "leaf SANs {leaf_names:?} lack {name}"
    );
    for pair in certs.windows(2) {
        pair[0].verify_signature(Some(pair[1].public_key()))?;
    }
    let root_pem = plane.pebble_root_pem().await?;
    let (_, root) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes())?;
    let root = root.parse_x509()?;
    let last = certs.last().context("empty chain")?;
    last.verify_signature(Some(root.public_key()))
        .context("chain does not end at Pebble's root from /roots/0")?;
    ensure!(
        last.issuer() == root.subject(),
        "issuer/subject mismatch at the top of the chain"
    );
    Ok(())
}

fn random_name(prefix: &str) -> String {
    format!("{prefix}-{}.plane.example", rand::random::<u32>() % 1_000_000)
}

/// HTTP-01 against a responder the test runs on a loopback address, which challtestsrv
/// points the name at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_a_certificate_over_http01() -> anyhow::Result<()> {
    let plane = Plane::get().await.context("local plane")?;
    // A loopback address of this test's own, so parallel tests don't collide on port 8089.
    let responder_ip = Ipv4Addr::new(127, 0, 0, 41);
    let name = random_name("acme");
    let tokens = Arc::new(Mutex::new(HashMap::new()));
    http01_responder((responder_ip, 8089), tokens.clone()).await?;
    plane.add_a(&name, responder_ip).await?;
    let result = issue_and_check(plane, &name, |token, key_authorization| {
        tokens
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(token.to_owned(), key_authorization.to_owned());
        Ok(())
    })
    .await;
    let _ = plane.clear_a(&name).await;
    result
}

/// The spec of a Pod that serves HTTP-01 files on :8089 (busybox httpd) from an emptyDir at
/// `/www/.well-known`, which [`publish_in_pod`] writes to.
fn solver_spec(readiness: serde_json::Value) -> serde_json::Value {
    json!({
        "automountServiceAccountToken": false,
        // httpd as PID 1 ignores SIGTERM: no reason to wait 30 s when the test is done.
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "http", "image": "example/app:1.0",
            "command": ["httpd", "-f", "-p", "8089", "-h", "/www"],
            "ports": [{"name": "http01", "containerPort": 8089}],
            "readinessProbe": readiness,
            "volumeMounts": [{"name": "well-known", "mountPath": "/www/.well-known"}]
        }],
        "volumes": [{"name": "well-known", "emptyDir": {}}]
    })
}

/// The Pod `solver` ([`solver_spec`], Ready once httpd answers) behind the Service `solver`
/// (port 8089).
async fn solver_behind_service(ns: &TestNamespace) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "solver", "labels": {"app": "solver"}},
        "spec": solver_spec(json!({"httpGet": {"path": "/", "port": 8089}, "periodSeconds": 1}))
    }))?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "solver"},
        "spec": {"selector": {"app": "solver"}, "ports": [{"port": 8089}]}
    }))?;
    ns.api::<Service>()
        .create(&PostParams::default(), &service)
        .await?;
    Ok(())
}

/// Waits until Traefik sends `host`'s challenge path to the solver Pod (busybox httpd's own
/// 404 page for an unknown file, not Traefik's `404 page not found`): it applies changes at
/// most every 2 s, so a ready endpoint is not yet a route.
async fn routed_to_solver(plane: &Plane, host: &str) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(20), || async {
        let r = sidecert_e2e::ingress::http_get(plane.ingress_http(), host, PROBE)
            .await
            .ok()?;
        (r.status == 404 && r.body.contains(HTTPD_NOT_FOUND)).then_some(())
    })
    .await
    .with_context(|| format!("Traefik does not route {host}'s challenge path to the solver Pod"))
}

/// Writes a key authorization where the solver Pod's httpd serves it (`kubectl exec`).
fn publish_in_pod(plane: &Plane, ns: &str, token: &str, key_authorization: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "token {token:?} is not base64url"
    );
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", plane.kubeconfig())
        .args(["--request-timeout=30s", "-n", ns, "exec", "solver", "-c", "http", "--", "sh", "-c"])
        .arg(format!(
            "mkdir -p /www/.well-known/acme-challenge && printf %s \"$1\" > /www/.well-known/acme-challenge/{token}"
        ))
        .args(["publish", key_authorization])
        .output()
        .context("run kubectl exec")?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl exec: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// plane-dns: a Pod annotated `sidecert.io/domains` resolves to its own IP, so Pebble
/// validates HTTP-01 against a server inside the Pod's network namespace. Its tcpSocket
/// readiness probe gates Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_domains_resolve_to_the_pod_for_http01() -> anyhow::Result<()> {
    let name = random_name("pod");
    in_namespace("e2e-dns", |plane, ns| async move {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "solver", "annotations": {"sidecert.io/domains": name}},
            "spec": solver_spec(json!({"tcpSocket": {"port": "http01"}, "periodSeconds": 1}))
        }))?;
        let pods: Api<Pod> = ns.api();
        pods.create(&PostParams::default(), &pod).await?;
        wait_for(Duration::from_secs(60), || async {
            let p = pods.get("solver").await.ok()?;
            is_ready(&p).then_some(())
        })
        .await
        .context("the solver Pod becomes Ready through its readiness probe")?;
        plane
            .wait_dns_record(&name, Duration::from_secs(10))
            .await
            .context("plane-dns points the Pod's domain at the Pod")?;
        issue_and_check(plane, &name, |token, key_authorization| {
            publish_in_pod(plane, ns.name(), token, key_authorization)
        })
        .await
    })
    .await
}

/// plane-dns for Ingresses: a host resolves to the address the ingress controller (Traefik)
/// published in the Ingress's status, and Traefik routes the host's
/// `/.well-known/acme-challenge/` path to the Pod behind it, where Pebble validates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_hosts_resolve_to_the_ingress_controller_which_routes_the_challenge() -> anyhow::Result<()> {
    let name = random_name("ing");
    in_namespace("e2e-ingress", |plane, ns| async move {
        solver_behind_service(&ns).await?;
        let ingress: k8s_openapi::api::networking::v1::Ingress = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {
                "tls": [{"hosts": [name], "secretName": "web-tls"}],
                "rules": [{"host": name, "http": {"paths": [
                    {"path": "/", "pathType": "Prefix",
                     "backend": {"service": {"name": "elsewhere", "port": {"number": 80}}}},
                    {"path": "/.well-known/acme-challenge/", "pathType": "Prefix",
                     "backend": {"service": {"name": "solver", "port": {"number": 8089}}}}
                ]}}]
            }
        }))?;
        ns.api::<k8s_openapi::api::networking::v1::Ingress>()
            .create(&PostParams::default(), &ingress)
            .await?;
        let slices: Api<EndpointSlice> = ns.api();
        wait_for(Duration::from_secs(60), || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=solver"))
                .await
                .ok()?;
            list.items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .then_some(())
        })
        .await
        .context("the solver Service has a ready endpoint")?;
        let ingresses = ns.api::<k8s_openapi::api::networking::v1::Ingress>();
        let published = wait_for(Duration::from_secs(30), || async {
            let ing = ingresses.get("web").await.ok()?;
            let lb = ing.status?.load_balancer?.ingress?;
            lb.first()?.ip.clone()
        })
        .await
        .context("Traefik published no address in the Ingress's status")?;
        anyhow::ensure!(
            published == plane.ingress_https().ip().to_string(),
            "the Ingress's status says {published}, want the ingress controller's {}",
            plane.ingress_https().ip()
        );
        plane
            .wait_dns_record(&name, Duration::from_secs(10))
            .await
            .context("plane-dns points the Ingress host at the ingress controller")?;
        routed_to_solver(plane, &name).await?;
        issue_and_check(plane, &name, |token, key_authorization| {
            publish_in_pod(plane, ns.name(), token, key_authorization)
        })
        .await
    })
    .await
}

/// Traefik's Gateway API provider: a Gateway of the class the plane exports, with an HTTP
/// listener on Pebble's port and an HTTPS one on Traefik's, and an HTTPRoute to a Pod. The
/// Gateway is programmed with the node's address, plane-dns points the hostname there,
/// Pebble validates HTTP-01 through the Gateway's HTTP listener, and the HTTPS listener
/// serves the certificate its `certificateRefs` Secret holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_routes_http01_and_serves_its_listeners_certificate() -> anyhow::Result<()> {
    use kube::api::DynamicObject;
    use sidecert_e2e::dns::gateway_api;

    let name = random_name("gw");
    in_namespace("e2e-gateway", |plane, ns| async move {
        let env = |key: &str| std::env::var(key).ok();
        let class = env("GATEWAY_CLASS").unwrap_or_else(|| "traefik".into());
        let (http_port, https_port) = (plane.ingress_http().port(), plane.ingress_https().port());

        solver_behind_service(&ns).await?;

        // The HTTPS listener's certificate: self-signed for the hostname (openssl).
        let dir = std::env::temp_dir().join(format!("sidecert-e2e-{name}"));
        std::fs::create_dir_all(&dir)?;
        let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
            ])
            .args([
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                &format!("subjectAltName=DNS:{name}"),
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .context("run openssl")?;
        ensure!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let crt_pem = std::fs::read_to_string(&crt)?;
        let key_pem = std::fs::read_to_string(&key)?;
        std::fs::remove_dir_all(&dir)?;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "gw-tls"}, "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": &crt_pem, "tls.key": key_pem}
        }))?;
        ns.api::<Secret>().create(&PostParams::default(), &secret).await?;

        let gw_api = gateway_api("Gateway");
        let route_api = gateway_api("HTTPRoute");
        let gateways: Api<DynamicObject> = Api::namespaced_with(ns.client(), ns.name(), &gw_api);
        let routes: Api<DynamicObject> = Api::namespaced_with(ns.client(), ns.name(), &route_api);
        let gateway: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge"},
            "spec": {"gatewayClassName": class, "listeners": [
                {"name": "http", "protocol": "HTTP", "port": http_port, "hostname": name},
                {"name": "https", "protocol": "HTTPS", "port": https_port, "hostname": name,
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": "gw-tls"}]}}
            ]}
        }))?;
        gateways.create(&PostParams::default(), &gateway).await?;
        let route: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "solver"},
            "spec": {"parentRefs": [{"name": "edge"}], "hostnames": [name],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                "backendRefs": [{"name": "solver", "port": 8089}]}]}
        }))?;
        routes.create(&PostParams::default(), &route).await?;

        let programmed = wait_for(Duration::from_secs(60), || async {
            let gw = gateways.get("edge").await.ok()?;
            let conditions = gw.data["status"]["conditions"].as_array()?.clone();
            let ok = conditions
                .iter()
                .any(|c| c["type"] == "Programmed" && c["status"] == "True");
            let address = gw.data["status"]["addresses"][0]["value"].as_str()?.to_owned();
            ok.then_some(address)
        })
        .await
        .context("Traefik did not program the Gateway")?;
        ensure!(
            programmed == plane.ingress_https().ip().to_string(),
            "the Gateway's status address is {programmed}, want the node's {}",
            plane.ingress_https().ip()
        );
        plane
            .wait_dns_record(&name, Duration::from_secs(20))
            .await
            .context("plane-dns points the Gateway's hostname at Traefik")?;
        // Ready before Pebble asks: the route has an endpoint only then.
        let pods: Api<Pod> = ns.api();
        wait_for(Duration::from_secs(60), || async {
            let p = pods.get("solver").await.ok()?;
            is_ready(&p).then_some(())
        })
        .await
        .context("the solver Pod is not Ready")?;
        let want_leaf = x509_parser::pem::parse_x509_pem(crt_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .1
            .contents;
        routed_to_solver(plane, &name).await?;
        // HTTPS: the listener's certificate, and the route to the Pod (its httpd has no such
        // file, so its own 404 page shows the request reached it).
        wait_for(Duration::from_secs(30), || async {
            let r = sidecert_e2e::ingress::https_get(plane.ingress_https(), &name, PROBE)
                .await
                .ok()?;
            (r.chain.first() == Some(&want_leaf) && r.status == 404 && r.body.contains(HTTPD_NOT_FOUND))
                .then_some(())
        })
        .await
        .context("the Gateway's HTTPS listener does not serve gw-tls's certificate and route to the Pod")?;
        issue_and_check(plane, &name, |token, key_authorization| {
            publish_in_pod(plane, ns.name(), token, key_authorization)
        })
        .await
    })
    .await
}
