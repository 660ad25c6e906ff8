//! Workload restarts: the Pods behind an Ingress (or a Gateway or ListenerSet) that lack the sidecar get their workload
//! restarted once per generation of that object (like `kubectl rollout restart`), with an Event;
//! Pods without a restartable owner are named in an Event, never deleted.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
        core::v1::{ObjectReference, Pod},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::events::EventType,
};
use serde::de::DeserializeOwned;
use sidecert_contract::annotations::RESTARTED_FOR;

use crate::{
    error::{Error, Result},
    reconciler::{
        context::Reconciler,
        plan::{
            Workload, controller_of, pod_list, pods_without_sidecar, restart_patch, restarted_for,
            selector_string, workload_of,
        },
    },
};

impl Reconciler {
    /// Restarts (once per Ingress generation) the workloads of Pods that lack the sidecar.
    pub(super) async fn roll(
        &self,
        target: &ObjectReference,
        what: &str,
        ns: &str,
        selectors: &[BTreeMap<String, String>],
        key: &str,
    ) -> Result<()> {
        let pods_api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let mut lacking: BTreeMap<String, Pod> = BTreeMap::new();
        for selector in selectors {
            let lp = ListParams::default().labels(&selector_string(selector));
            let pods = pods_api.list(&lp).await?.items;
            for p in pods_without_sidecar(std::slice::from_ref(selector), &pods) {
                lacking.insert(p.name_any(), p.clone());
            }
        }
        if lacking.is_empty() {
            return Ok(());
        }
        let rs_api = Api::<ReplicaSet>::namespaced(self.client.clone(), ns);
        let mut rs_owners: HashMap<String, Option<OwnerReference>> = HashMap::new();
        let mut workloads: BTreeMap<Workload, Vec<String>> = BTreeMap::new();
        let mut stranded: Vec<String> = Vec::new();
        for (pod_name, pod) in &lacking {
            if let Some(rs) = controller_of(&pod.metadata).filter(|o| o.kind == "ReplicaSet")
                && !rs_owners.contains_key(&rs.name)
            {
                let meta = rs_api.get_metadata_opt(&rs.name).await?;
                let owner = meta.and_then(|m| controller_of(&m.metadata).cloned());
                rs_owners.insert(rs.name.clone(), owner);
            }
            match workload_of(pod, |rs| rs_owners.get(rs).cloned().flatten()) {
                Ok(w) => workloads.entry(w).or_default().push(pod_name.clone()),
                Err(why) => stranded.push(format!("{pod_name} ({why})")),
            }
        }

        let mut not_restarted = Vec::new();
        for (workload, pods) in &workloads {
            if !self.settings.rollout_restart {
                not_restarted.push(format!("{} {}", workload.kind(), workload.name()));
                continue;
            }
            if self.restart(ns, workload, key).await? {
                self.action("rollout_restart");
                tracing::info!(
                    namespace = ns,
                    object = what,
                    name = target.name.as_deref().unwrap_or_default(),
                    workload = workload.name(),
                    "rollout restart"
                );
                self.event(
                    target,
                    EventType::Normal,
                    "RolloutRestart",
                    "Restart",
                    format!(
                        "restarted {} {}: its Pods {} back this {what} but have no sidecert sidecar \
                         (created before the {what} was annotated, or while the webhook was unavailable)",
                        workload.kind(),
                        workload.name(),
                        pod_list(pods),
                    ),
                    Some(workload.reference(ns)),
                )
                .await;
            }
        }
        let mut notes = Vec::new();
        if !not_restarted.is_empty() {
            notes.push(format!(
                "{} have Pods without the sidecert sidecar behind this {what}; restart them \
                 (kubectl rollout restart): automatic restarts are off",
                not_restarted.join(", ")
            ));
        }
        if !stranded.is_empty() {
            notes.push(format!(
                "Pods {} back this {what} without the sidecert sidecar and have no workload sidecert \
                 can restart; recreate them (sidecert never deletes Pods)",
                pod_list(&stranded)
            ));
        }
        if !notes.is_empty() {
            self.warn_once(target, "PodsWithoutSidecar", notes.join("; "))
                .await;
        }
        Ok(())
    }

    async fn restart(&self, ns: &str, workload: &Workload, key: &str) -> Result<bool> {
        let c = self.client.clone();
        match workload {
            Workload::Deployment(n) => {
                restart_workload(
                    &Api::<Deployment>::namespaced(c, ns),
                    n,
                    key,
                    |d| d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref(),
                    |d| {
                        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                        d.status.as_ref().is_some_and(|s| {
                            s.observed_generation < d.metadata.generation
                                || s.updated_replicas.unwrap_or(0) < want
                                || s.replicas.unwrap_or(0) > want
                        })
                    },
                )
                .await
            }
            Workload::StatefulSet(n) => {
                restart_workload(
                    &Api::<StatefulSet>::namespaced(c, ns),
                    n,
                    key,
                    |d| d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref(),
                    |d| {
                        d.status.as_ref().is_some_and(|s| {
                            s.update_revision.is_some() && s.update_revision != s.current_revision
                        })
                    },
                )
                .await
            }
            Workload::DaemonSet(n) => {
                restart_workload(
                    &Api::<DaemonSet>::namespaced(c, ns),
                    n,
                    key,
                    |d| d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref(),
                    |d| {
                        d.status.as_ref().is_some_and(|s| {
                            s.updated_number_scheduled.unwrap_or(0) < s.desired_number_scheduled
                        })
                    },
                )
                .await
            }
        }
    }
}

/// Restarts one workload unless [`RESTARTED_FOR`] already holds `key`, or a restart of ours
/// is still rolling out (`rolling`: its new Pods replace the old ones anyway); `true` when it
/// did.
pub async fn restart_workload<K>(
    api: &Api<K>,
    name: &str,
    key: &str,
    template_annotations: impl Fn(&K) -> Option<&BTreeMap<String, String>>,
    rolling: impl Fn(&K) -> bool,
) -> Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let obj = api.get(name).await?;
    let existing = template_annotations(&obj).and_then(|a| a.get(RESTARTED_FOR));
    if existing.is_some() && rolling(&obj) {
        return Ok(false);
    }
    let Some(value) = restarted_for(existing.map(String::as_str), key) else {
        return Ok(false);
    };
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::config("time", e))?;
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&restart_patch(&now, &value)),
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use http::{Method, StatusCode};
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        reconciler::plan::RESTARTED_AT,
        testing::{client, next},
    };

    fn deployment(annotations: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}, "annotations": annotations},
                                     "spec": {"containers": [{"name": "app", "image": "example/app"}]}}}})
    }

    fn template_annotations(d: &Deployment) -> Option<&BTreeMap<String, String>> {
        d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn restart_patches_the_template_like_kubectl_once() {
        let (client, mut handle) = client();
        let api = Api::<Deployment>::namespaced(client, "shop");
        let a = api.clone();
        let task = tokio::spawn(async move {
            restart_workload(&a, "web", "u-1:3", template_annotations, |_| false).await
        });
        let path = "/apis/apps/v1/namespaces/shop/deployments/web";
        next(
            &mut handle,
            Method::GET,
            path,
            StatusCode::OK,
            deployment(json!({})),
        )
        .await;
        let body = next(
            &mut handle,
            Method::PATCH,
            path,
            StatusCode::OK,
            deployment(json!({})),
        )
        .await;
        let ann = &body["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann[RESTARTED_FOR], "u-1:3");
        let at = ann[RESTARTED_AT].as_str().unwrap();
        assert!(time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok());
        assert!(task.await.unwrap().unwrap());

        // Already restarted and that rollout still runs: a GET and nothing else.
        let task = tokio::spawn(async move {
            restart_workload(&api, "web", "u-2:1", template_annotations, |_| true).await
        });
        next(
            &mut handle,
            Method::GET,
            path,
            StatusCode::OK,
            deployment(json!({RESTARTED_FOR: "u-0:1,u-1:3"})),
        )
        .await;
        assert!(!task.await.unwrap().unwrap());
    }
}
