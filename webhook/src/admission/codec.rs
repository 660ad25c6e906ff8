//! The AdmissionReview codec: the envelope as it arrives (the object stays raw until its
//! kind is known, then is decoded once into its typed struct), and the response written back.

use k8s_openapi::{
    ByteString,
    api::{authentication::v1::UserInfo, core::v1::Pod, networking::v1::Ingress},
};
use kube::core::{
    DynamicObject, GroupVersionKind, GroupVersionResource, Resource, TypeMeta,
    admission::{AdmissionRequest, Operation},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::value::RawValue;

use crate::{
    error::{Error, MAX_BODY_BYTES, Result},
    mutate::outcome::Outcome,
};

/// The review as it arrives; the object stays raw until its kind is known, then is decoded
/// once into its typed struct.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(borrow)]
    request: Option<RawRequest<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRequest<'a> {
    uid: String,
    kind: GroupVersionKind,
    resource: GroupVersionResource,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    request_kind: Option<GroupVersionKind>,
    #[serde(default)]
    request_resource: Option<GroupVersionResource>,
    #[serde(default)]
    request_sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    operation: Operation,
    #[serde(default)]
    user_info: UserInfo,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    old_object: Option<&'a RawValue>,
    #[serde(default)]
    dry_run: bool,
}

/// A decoded admission request.
#[derive(Debug, Clone)]
pub enum Request {
    Pod(Box<AdmissionRequest<Pod>>),
    Ingress(Box<AdmissionRequest<Ingress>>),
    /// Another kind, or an object that could not be decoded (`warning` says why).
    Other {
        request: Box<AdmissionRequest<DynamicObject>>,
        warning: String,
    },
}

impl Request {
    pub fn kind_label(&self) -> &'static str {
        match self {
            Self::Pod(_) => "pod",
            Self::Ingress(_) => "ingress",
            Self::Other { .. } => "other",
        }
    }

    pub fn operation(&self) -> &Operation {
        match self {
            Self::Pod(r) => &r.operation,
            Self::Ingress(r) => &r.operation,
            Self::Other { request, .. } => &request.operation,
        }
    }

    pub fn dry_run(&self) -> bool {
        match self {
            Self::Pod(r) => r.dry_run,
            Self::Ingress(r) => r.dry_run,
            Self::Other { request, .. } => request.dry_run,
        }
    }

    pub fn uid(&self) -> &str {
        match self {
            Self::Pod(r) => &r.uid,
            Self::Ingress(r) => &r.uid,
            Self::Other { request, .. } => &request.uid,
        }
    }

    /// The request's namespace (empty for a cluster-scoped object).
    pub fn namespace(&self) -> &str {
        let ns = match self {
            Self::Pod(r) => &r.namespace,
            Self::Ingress(r) => &r.namespace,
            Self::Other { request, .. } => &request.namespace,
        };
        ns.as_deref().unwrap_or_default()
    }
}

/// The operation as a metric label.
pub fn operation_label(op: &Operation) -> &'static str {
    match op {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

impl<'a> RawRequest<'a> {
    fn typed<T: Resource + DeserializeOwned>(
        &self,
        types: &TypeMeta,
    ) -> std::result::Result<AdmissionRequest<T>, serde_json::Error> {
        self.typed_with(types, |json: &str| serde_json::from_str::<T>(json))
    }

    fn typed_with<T: Resource>(
        &self,
        types: &TypeMeta,
        from_str: impl Fn(&str) -> serde_json::Result<T>,
    ) -> std::result::Result<AdmissionRequest<T>, serde_json::Error> {
        let decode = |raw: Option<&'a RawValue>| raw.map(|r| from_str(r.get())).transpose();
        Ok(self.with_objects(types, decode(self.object)?, decode(self.old_object)?))
    }

    /// A request of another kind, or one whose object could not be decoded: everything
    /// but the objects, which the webhook does not need to answer it.
    fn other(&self, types: &TypeMeta, warning: String) -> Request {
        Request::Other {
            request: Box::new(self.with_objects(types, None, None)),
            warning,
        }
    }

    fn with_objects<T: Resource>(
        &self,
        types: &TypeMeta,
        object: Option<T>,
        old_object: Option<T>,
    ) -> AdmissionRequest<T> {
        AdmissionRequest {
            types: types.clone(),
            uid: self.uid.clone(),
            kind: self.kind.clone(),
            resource: self.resource.clone(),
            sub_resource: self.sub_resource.clone(),
            request_kind: self.request_kind.clone(),
            request_resource: self.request_resource.clone(),
            request_sub_resource: self.request_sub_resource.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            operation: self.operation.clone(),
            user_info: self.user_info.clone(),
            object,
            old_object,
            dry_run: self.dry_run,
            options: None,
        }
    }
}

/// Decodes a Pod without what the webhook never reads: `metadata.managedFields` (a
/// free-form JSON tree per field manager, the costliest part of a review to decode) and
/// `status` (empty at CREATE). Both are skipped by serde without building anything. The
/// patch is computed against this view; it touches neither.
fn decode_pod(json: &str) -> serde_json::Result<Pod> {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::PodSpec,
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    };

    #[derive(Deserialize)]
    struct PodView {
        #[serde(default)]
        metadata: MetaView,
        #[serde(default)]
        spec: Option<PodSpec>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    struct MetaView {
        annotations: Option<BTreeMap<String, String>>,
        creation_timestamp: Option<Time>,
        deletion_grace_period_seconds: Option<i64>,
        deletion_timestamp: Option<Time>,
        finalizers: Option<Vec<String>>,
        generate_name: Option<String>,
        generation: Option<i64>,
        labels: Option<BTreeMap<String, String>>,
        name: Option<String>,
        namespace: Option<String>,
        owner_references: Option<Vec<OwnerReference>>,
        resource_version: Option<String>,
        self_link: Option<String>,
        uid: Option<String>,
    }
    let PodView { metadata: m, spec } = serde_json::from_str(json)?;
    Ok(Pod {
        metadata: ObjectMeta {
            annotations: m.annotations,
            creation_timestamp: m.creation_timestamp,
            deletion_grace_period_seconds: m.deletion_grace_period_seconds,
            deletion_timestamp: m.deletion_timestamp,
            finalizers: m.finalizers,
            generate_name: m.generate_name,
            generation: m.generation,
            labels: m.labels,
            managed_fields: None,
            name: m.name,
            namespace: m.namespace,
            owner_references: m.owner_references,
            resource_version: m.resource_version,
            self_link: m.self_link,
            uid: m.uid,
        },
        spec,
        status: None,
    })
}

/// Parses a request body. `Err` is an HTTP 400 (or 413) answer; an unknown kind or an
/// undecodable object is an `Ok(Request::Other)` that is admitted with a warning.
pub fn parse(body: &[u8]) -> Result<Request> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Error::TooLarge(body.len()));
    }
    let env: Envelope<'_> = serde_json::from_slice(body).map_err(Error::UndecodableReview)?;
    if let Some(kind) = env.kind.as_deref().filter(|k| *k != "AdmissionReview") {
        return Err(Error::InvalidReview(format!(
            "kind is {kind:?}, expected \"AdmissionReview\""
        )));
    }
    let api_version = env.api_version.unwrap_or_default();
    if !matches!(
        api_version.as_str(),
        "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
    ) {
        return Err(Error::InvalidReview(format!(
            "apiVersion is {api_version:?}, expected \"admission.k8s.io/v1\""
        )));
    }
    let raw = env
        .request
        .ok_or_else(|| Error::InvalidReview("it has no request".to_owned()))?;
    let types = TypeMeta {
        api_version,
        kind: "AdmissionReview".to_owned(),
    };
    if let Some(sub) = &raw.sub_resource {
        return Ok(raw.other(&types, format!("sidecert: subresource {sub} is not mutated")));
    }
    let k = &raw.kind;
    Ok(match (k.group.as_str(), k.version.as_str(), k.kind.as_str()) {
        ("", "v1", "Pod") => match raw.typed_with(&types, decode_pod) {
            Ok(r) => Request::Pod(Box::new(r)),
            Err(e) => raw.other(
                &types,
                format!("sidecert: could not decode the Pod ({e}); not mutated"),
            ),
        },
        ("networking.k8s.io", "v1", "Ingress") => match raw.typed::<Ingress>(&types) {
            Ok(r) => Request::Ingress(Box::new(r)),
            Err(e) => raw.other(
                &types,
                format!("sidecert: could not decode the Ingress ({e}); not mutated"),
            ),
        },
        (g, v, kind) => {
            let gv = if g.is_empty() {
                v.to_owned()
            } else {
                format!("{g}/{v}")
            };
            raw.other(
                &types,
                format!("sidecert: {gv} {kind} is not a kind sidecert mutates"),
            )
        }
    })
}

/// numbers; this writes base64 like the API server's own types (a third of the size).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<ByteString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// The serialised response for a request and its outcome.
pub fn respond<T: Resource>(req: &AdmissionRequest<T>, outcome: Outcome) -> Result<Vec<u8>> {
    let patch = if outcome.patch.is_empty() {
        None
    } else {
        Some(ByteString(serde_json::to_vec(&outcome.patch)?))
    };
    let out = ReviewOut {
        api_version: &req.types.api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid: &req.uid,
            allowed: true,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            warnings: outcome.warnings,
        },
    };
    Ok(serde_json::to_vec(&out)?)
}

#[cfg(test)]
mod decode_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pod_view_keeps_all_but_managed_fields_and_status() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web", "namespace": "shop", "generateName": "web-", "uid": "u1",
                "labels": {"app": "web"}, "annotations": {"sidecert.io/inject": "true"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u2"}],
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}}]
            },
            "spec": {"containers": [{"name": "app", "image": "example/app"}]},
            "status": {"phase": "Pending"}
        })
        .to_string();
        let full: Pod = serde_json::from_str(&json).unwrap();
        let view = decode_pod(&json).unwrap();
        let mut expected = full.clone();
        expected.metadata.managed_fields = None;
        expected.status = None;
        assert_eq!(view, expected);
        assert!(decode_pod(r#"{"spec": {"containers": 7}}"#).is_err());
    }
}
