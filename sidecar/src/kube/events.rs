//! Events on the Pod: Issued, Renewed, Failed (with the CA's problem detail).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use sidecert_contract::PodIdentity;

/// Publishes Events about the Pod; without a Pod name it only logs.
#[derive(Clone)]
pub struct PodEvents {
    recorder: Option<(Recorder, ObjectReference)>,
}

impl PodEvents {
    pub fn new(client: Client, pod: &PodIdentity, namespace: &str) -> Self {
        let recorder = pod.name.as_ref().map(|name| {
            let reporter = Reporter {
                controller: "sidecert-sidecar".into(),
                instance: Some(name.clone()),
            };
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.clone()),
                namespace: Some(namespace.to_owned()),
                uid: pod.uid.clone(),
                ..Default::default()
            };
            (Recorder::new(client, reporter), reference)
        });
        Self { recorder }
    }

    pub fn disabled() -> Self {
        Self { recorder: None }
    }

    /// Publishes one Event; failures are logged, never fatal.
    pub async fn publish(&self, warning: bool, reason: &str, note: String) {
        let Some((recorder, reference)) = &self.recorder else {
            return;
        };
        let mut note = note;
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Certificate".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, reference).await {
            tracing::warn!(reason, error = %e, "publishing an Event");
        }
    }
}
