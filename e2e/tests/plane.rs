//! The local plane, end to end: the controller-manager makes Pods, the stand-in binds and
//! runs them, EndpointSlices follow; a Pod's process gets its env and ServiceAccount token;
//! Pebble issues a certificate over HTTP-01 through challtestsrv's DNS.
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
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;
use sidecert_e2e::{Plane, TestNamespace, wait_for};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const NODE: &str = "sidecert-local";

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
async fn deployment_runs_on_the_stand_in_and_gets_endpoints() -> anyhow::Result<()> {
    in_namespace("e2e-deploy", |_plane, ns| async move {
        let deployments: Api<Deployment> = ns.api();
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "app", "image": "example/app",
                                             "ports": [{"containerPort": 8080}]}]}
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
/// ConfigMap, `$(VAR)`), its network namespace and its ServiceAccount token (authenticated
/// by the API server, and without rights: 403), and exits 0, so the Job completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_process_gets_env_network_and_token() -> anyhow::Result<()> {
    in_namespace("e2e-job", |plane, ns| async move {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}
        }))?;
        ns.api::<Secret>().create(&PostParams::default(), &secret).await?;
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "settings"}, "data": {"greeting": "hello"}
        }))?;
        ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await?;
        let script = r#"set -eu
echo "pod $POD_NAME ip $POD_IP"
ip -4 -o addr show eth0 | grep -q " $POD_IP/"
test "$PASSWORD" = hunter2
test "$MSG" = "hello world"
test "$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT" = "$API"
sa=/var/run/secrets/kubernetes.io/serviceaccount
test "$(cat $sa/namespace)" = "$NS"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert $sa/ca.crt \
  -H "Authorization: Bearer $(cat $sa/token)" \
  "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/$NS/secrets")
echo "API answered $code"
test "$code" = 403
echo all-checks-passed"#;
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "check"},
            "spec": {
                "backoffLimit": 0,
                "template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "check", "image": "sidecert.test/shell:latest",
                        "command": ["sh", "-c", script],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                            {"name": "MSG", "value": "$(GREETING) world"},
                            {"name": "API", "value": format!("{}:6443", plane.gateway())}
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
        let log_dir = plane.repo_root().join("e2e/.state/logs/pods");
        let mut found = false;
        for entry in std::fs::read_dir(&log_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{}_check-", ns.name())) {
                let text = std::fs::read_to_string(entry.path())?;
                found |= text.contains("all-checks-passed");
            }
        }
        ensure!(found, "container log in {} says all-checks-passed", log_dir.display());
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

/// The DNS sync: a Pod annotated `sidecert.io/domains` resolves to its own IP, so Pebble
/// validates HTTP-01 against a server inside the Pod's network namespace. The Pod serves its
/// working directory on :8089 (python3's http.server); the test drops the key authorization
/// there. Its tcpSocket readiness probe gates Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_domains_resolve_to_the_pod_for_http01() -> anyhow::Result<()> {
    let name = random_name("pod");
    in_namespace("e2e-dns", |plane, ns| async move {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "solver", "annotations": {"sidecert.io/domains": name}},
            "spec": {
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "http", "image": "sidecert.test/shell",
                    "command": ["sh", "-c", "exec python3 -m http.server 8089 --bind 0.0.0.0"],
                    "ports": [{"name": "http01", "containerPort": 8089}],
                    "readinessProbe": {"tcpSocket": {"port": "http01"}, "periodSeconds": 1}
                }]
            }
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
            .context("the DNS sync points the Pod's domain at the Pod")?;
        let workdir = plane
            .repo_root()
            .join(format!("e2e/.state/pods/{}_solver", ns.name()));
        issue_and_check(plane, &name, |token, key_authorization| {
            let dir = workdir.join(".well-known/acme-challenge");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(token), key_authorization)?;
            Ok(())
        })
        .await
    })
    .await
}

/// The DNS sync for Ingresses: a TLS host resolves to the ready endpoints of the Service
/// behind the host's `/.well-known/acme-challenge/` path, so Pebble reaches the Pod behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_tls_hosts_resolve_to_the_challenge_backend() -> anyhow::Result<()> {
    let name = random_name("ing");
    in_namespace("e2e-ingress", |plane, ns| async move {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "solver", "labels": {"app": "solver"}},
            "spec": {
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "http", "image": "sidecert.test/shell",
                    "command": ["sh", "-c", "exec python3 -m http.server 8089 --bind 0.0.0.0"],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8089}, "periodSeconds": 1}
                }]
            }
        }))?;
        ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "solver"},
            "spec": {"selector": {"app": "solver"}, "ports": [{"port": 8089}]}
        }))?;
        ns.api::<Service>()
            .create(&PostParams::default(), &service)
            .await?;
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
        plane
            .wait_dns_record(&name, Duration::from_secs(10))
            .await
            .context("the DNS sync points the Ingress host at the solver")?;
        let workdir = plane
            .repo_root()
            .join(format!("e2e/.state/pods/{}_solver", ns.name()));
        issue_and_check(plane, &name, |token, key_authorization| {
            let dir = workdir.join(".well-known/acme-challenge");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(token), key_authorization)?;
            Ok(())
        })
        .await
    })
    .await
}
