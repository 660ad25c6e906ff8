//! The Ingress reconciler against the local control plane. Two webhook replicas run in-process
//! (`serve --reconcile`, one Lease); a url MutatingWebhookConfiguration, restricted to this
//! run's namespace label, points the API server at the follower. Scenarios: a Deployment
//! created before its Ingress is annotated gets rolled (new Pods carry the sidecar and get the
//! certificate, an Event says why); a deleted or drifted solver Service comes back; taking the
//! annotation off removes the HTTP-01 path and the solver Service but keeps the Secret; only
//! the leader reconciles, and when it is killed the other replica takes over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Namespace, Pod, Secret, Service},
    events::v1::Event,
    networking::v1::Ingress,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use sidecert_e2e::{Plane, TestNamespace, wait_for};
use sidecert_webhook::server::serve_until;
use tokio::sync::oneshot;

mod common;
use common::{
    INGRESSES, PODS, TEST_LABEL, free_port, has_sidecar, in_own_runtime, pki, serve_args, webhook_config,
};

/// A replica running in its own thread and runtime. `kill` drops the runtime at once (no
/// graceful shutdown, no Lease release: like a killed Pod).
struct Replica {
    port: u16,
    metrics_port: u16,
    kill: Option<oneshot::Sender<()>>,
}

impl Replica {
    fn start(args: Vec<String>, port: u16, metrics_port: u16) -> Self {
        let serve_args = serve_args(args);
        let (kill, killed) = oneshot::channel::<()>();
        in_own_runtime(move || async move {
            tokio::select! {
                r = serve_until(serve_args, std::future::pending()) => if let Err(e) = r { eprintln!("webhook: {e}") },
                _ = killed => {}
            }
        });
        Self {
            port,
            metrics_port,
            kill: Some(kill),
        }
    }

    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await else {
            return 0.0;
        };
        let _ = tokio::io::AsyncWriteExt::write_all(
            &mut s,
            b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        )
        .await;
        let mut out = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await;
        out.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn has_challenge_path(ing: &Ingress) -> bool {
    ing.spec.as_ref().unwrap().rules.as_ref().unwrap()[0]
        .http
        .as_ref()
        .unwrap()
        .paths
        .iter()
        .any(|p| p.path.as_deref() == Some("/.well-known/acme-challenge/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_heals_rolls_and_hands_over() {
    let plane = Plane::get().await.expect("local plane");
    sidecert_webhook::install_crypto_provider();
    let client = plane.client().await.unwrap();
    let ip = plane.gateway();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let run = format!("rec{}-{:x}", std::process::id(), nanos % 0xffffff);
    let (ca, dir) = pki(ip, &run);

    let apps = plane.namespace("rec", true).await.unwrap();
    let system = plane.namespace("rec-sys", false).await.unwrap();
    let label = json!({"metadata": {"labels": {TEST_LABEL: run}}});
    Api::<Namespace>::all(client.clone())
        .patch(apps.name(), &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();

    let replica_args = |port: u16, metrics_port: u16| -> Vec<String> {
        [
            format!("--listen={ip}:{port}"),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            format!("--tls-cert-file={}", dir.join("tls.crt").display()),
            format!("--tls-key-file={}", dir.join("tls.key").display()),
            format!("--kubeconfig={}", plane.kubeconfig().display()),
            format!("--namespace={}", system.name()),
            "--reconcile=true".to_owned(),
            format!("--leader-lease-name=leader-{run}"),
            "--leader-lease-duration=4s".to_owned(),
            format!("--reconcile-namespace-selector=sidecert.io/injection=enabled,{TEST_LABEL}={run}"),
            "--workers=1".to_owned(),
            "--shutdown-timeout=1s".to_owned(),
            // The injected sidecar (the real binary on the plane) talks to Pebble: harmless.
            format!("--acme-server={}", plane.pebble_directory()),
            format!("--acme-ca-bundle-file={}", plane.pebble_ca_file().display()),
        ]
        .into()
    };
    let ports: Vec<(u16, u16)> = (0..2)
        .map(|_| (free_port(ip), free_port(Ipv4Addr::LOCALHOST)))
        .collect();
    let mut replicas: Vec<Replica> = ports
        .iter()
        .map(|&(p, m)| Replica::start(replica_args(p, m), p, m))
        .collect();

    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let hook_name = format!("sidecert-reconciler-test-{run}");
    let body = async {
        // Exactly one leader.
        let leader = wait_for(Duration::from_secs(30), || {
            let replicas = &replicas;
            async move {
                let mut leaders = Vec::new();
                for (i, r) in replicas.iter().enumerate() {
                    if r.metric("sidecert_webhook_leader").await == 1.0 {
                        leaders.push(i);
                    }
                }
                (leaders.len() == 1).then(|| leaders[0])
            }
        })
        .await
        .expect("one replica leads");
        let follower = 1 - leader;
        // Admission goes to the follower, so killing the leader leaves admission up.
        let url = format!("https://{ip}:{}/mutate", replicas[follower].port);
        hooks
            .create(
                &PostParams::default(),
                &webhook_config(&hook_name, &url, Some(&ca), &run, "Ignore", &[PODS, INGRESSES]),
            )
            .await
            .unwrap();
        scenarios(&apps, &mut replicas, leader, follower).await;
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(body)).await;
    let _ = hooks.delete(&hook_name, &DeleteParams::default()).await;
    drop(replicas);
    if outcome.is_err() {
        plane.dump_on_failure(apps.name()).await;
    }
    let _ = apps.cleanup().await;
    let _ = system.cleanup().await;
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

async fn scenarios(apps: &TestNamespace, replicas: &mut [Replica], leader: usize, follower: usize) {
    let pods: Api<Pod> = apps.api();
    let services: Api<Service> = apps.api();
    let ingresses: Api<Ingress> = apps.api();
    let deployments: Api<Deployment> = apps.api();

    // A Deployment and its Service, before any Ingress: its Pods have no sidecar.
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    let dep: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": "example/app:1.0"}]}}}
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &dep).await.unwrap();
    let web = ListParams::default().labels("app=web");
    let first = wait_for(Duration::from_secs(60), || {
        let pods = pods.clone();
        let web = web.clone();
        async move { pods.list(&web).await.ok()?.items.into_iter().next() }
    })
    .await
    .expect("the Deployment's Pod");
    assert!(!has_sidecar(&first), "no Ingress yet: no sidecar");

    // The Ingress, annotated, after the Pods exist.
    let ing: Ingress = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web", "annotations": {"sidecert.io/issue-temporary-certificate": "true"}},
        "spec": {
            "tls": [{"hosts": ["web.rec.example"], "secretName": "web-tls"}],
            "rules": [{"host": "web.rec.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "http"}}}}
            ]}}]
        }
    }))
    .unwrap();
    ingresses.create(&PostParams::default(), &ing).await.unwrap();

    // Rolled: a new Pod carries the sidecar; the template records the restart.
    wait_for(Duration::from_secs(90), || {
        let pods = pods.clone();
        let web = web.clone();
        async move {
            let list = pods.list(&web).await.ok()?.items;
            list.iter().any(has_sidecar).then_some(())
        }
    })
    .await
    .expect("the Deployment is rolled and its new Pod has the sidecar");
    let template_annotations = |d: Deployment| {
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap_or_default()
    };
    let ann = template_annotations(deployments.get("web").await.unwrap());
    assert!(ann.contains_key("kubectl.kubernetes.io/restartedAt"), "{ann:?}");
    let restarted_for = ann["sidecert.io/restarted-for"].clone();
    assert_eq!(restarted_for.split(',').count(), 1, "{restarted_for}");

    let events: Api<Event> = apps.api();
    let event = wait_for(Duration::from_secs(20), || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("RolloutRestart")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
                })
        }
    })
    .await
    .expect("an Event on the Ingress says why");
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("Deployment web") && note.contains("sidecar"),
        "{note}"
    );

    // The rolled Pod's sidecar gets the certificate: the temporary one in web-tls is replaced
    // by one Pebble issued.
    let secrets: Api<Secret> = apps.api();
    wait_for(Duration::from_secs(90), || {
        let secrets = secrets.clone();
        async move {
            let ann = secrets.get_opt("web-tls").await.ok()??.metadata.annotations?;
            let issued = ann.contains_key("sidecert.io/not-after")
                && ann.get("sidecert.io/temporary").map(String::as_str) != Some("true");
            issued.then_some(())
        }
    })
    .await
    .expect("the rolled Pod's sidecar replaces the temporary certificate");

    // The certificate's Lease, deleted: the sidecar's Role cannot create it, so the
    // reconciler does (at its next pass; a change of the backend Service brings that on).
    let leases: Api<Lease> = apps.api();
    leases
        .delete("sidecert-web-tls", &DeleteParams::default())
        .await
        .unwrap();
    let touch = json!({"metadata": {"annotations": {"test/touched": "lease"}}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .unwrap();
    let lease = wait_for(Duration::from_secs(20), || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("sidecert-web-tls")
                .await
                .ok()?
                .filter(|l| l.metadata.deletion_timestamp.is_none())
        }
    })
    .await
    .expect("the reconciler creates the certificate's Lease again");
    assert_eq!(
        lease
            .metadata
            .labels
            .unwrap_or_default()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("sidecert")
    );

    // Once per Ingress generation: no second restart.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ann = template_annotations(deployments.get("web").await.unwrap());
    assert_eq!(ann["sidecert.io/restarted-for"], restarted_for);

    // Only the leader reconciles.
    assert!(replicas[leader].metric("sidecert_webhook_reconciles_total").await > 0.0);
    assert_eq!(
        replicas[follower]
            .metric("sidecert_webhook_reconciles_total")
            .await,
        0.0
    );

    // The solver Service, deleted: back within seconds, owned by the Ingress.
    let solver = "web-sidecert-solver";
    services.delete(solver, &DeleteParams::default()).await.unwrap();
    let back = wait_for(Duration::from_secs(15), || {
        let services = services.clone();
        async move {
            services
                .get_opt(solver)
                .await
                .ok()?
                .filter(|s| s.metadata.deletion_timestamp.is_none())
        }
    })
    .await
    .expect("the solver Service comes back");
    let owners = back.metadata.owner_references.unwrap_or_default();
    assert!(
        owners.iter().any(|o| o.kind == "Ingress" && o.name == "web"),
        "{owners:?}"
    );

    // Its selector, changed: put back.
    let drift = json!({"spec": {"selector": {"app": "other"}}});
    services
        .patch(solver, &PatchParams::default(), &Patch::Merge(&drift))
        .await
        .unwrap();
    wait_for(Duration::from_secs(15), || {
        let services = services.clone();
        async move {
            let s = services.get(solver).await.ok()?;
            (s.spec?.selector? == BTreeMap::from([("app".to_owned(), "web".to_owned())])).then_some(())
        }
    })
    .await
    .expect("the solver's selector is repaired");

    // The annotation, removed: the path and the solver go, the Secret stays.
    let off = json!({"metadata": {"annotations": {"sidecert.io/issue-temporary-certificate": null}}});
    ingresses
        .patch("web", &PatchParams::default(), &Patch::Merge(&off))
        .await
        .unwrap();
    wait_for(Duration::from_secs(20), || {
        let ingresses = ingresses.clone();
        let services = services.clone();
        async move {
            let ing = ingresses.get("web").await.ok()?;
            let gone = services.get_opt(solver).await.ok()?.is_none();
            (!has_challenge_path(&ing) && gone).then_some(())
        }
    })
    .await
    .expect("HTTP-01 path and solver Service removed");
    assert!(
        apps.api::<Secret>().get_opt("web-tls").await.unwrap().is_some(),
        "the Secret is kept"
    );

    // Annotated again (admitted by the follower), then the leader is killed: the follower
    // takes over once the Lease expires, and heals a deleted solver.
    let on = json!({"metadata": {"annotations": {"sidecert.io/issue-temporary-certificate": "true"}}});
    let ing = ingresses
        .patch("web", &PatchParams::default(), &Patch::Merge(&on))
        .await
        .unwrap();
    assert!(has_challenge_path(&ing), "the follower serves admission");
    wait_for(Duration::from_secs(15), || {
        let services = services.clone();
        async move { services.get_opt(solver).await.ok()?.map(|_| ()) }
    })
    .await
    .expect("solver Service recreated");
    replicas[leader].kill();
    wait_for(Duration::from_secs(30), || {
        let r = &replicas[follower];
        async move { (r.metric("sidecert_webhook_leader").await == 1.0).then_some(()) }
    })
    .await
    .expect("the other replica takes the lead");
    services.delete(solver, &DeleteParams::default()).await.unwrap();
    wait_for(Duration::from_secs(20), || {
        let services = services.clone();
        async move {
            services
                .get_opt(solver)
                .await
                .ok()?
                .filter(|s| s.metadata.deletion_timestamp.is_none())
                .map(|s| s.name_any())
        }
    })
    .await
    .expect("the new leader recreates the solver");
    // The counter moves when the reconcile returns, a moment after the Service is created.
    wait_for(Duration::from_secs(10), || {
        let r = &replicas[follower];
        async move { (r.metric("sidecert_webhook_reconciles_total").await > 0.0).then_some(()) }
    })
    .await
    .expect("the new leader counts its reconciles");
}
