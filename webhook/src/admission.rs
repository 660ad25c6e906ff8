//! The AdmissionReview envelope, the review itself (shared by the server, the offline
//! commands and the tests), and the HTTP handlers.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use actix_web::{
    HttpResponse,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::ConnectionType,
    middleware::Next,
    web,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::{authentication::v1::UserInfo, core::v1::Pod, networking::v1::Ingress};
use kube::core::{
    DynamicObject, GroupVersionKind, GroupVersionResource, Resource, TypeMeta,
    admission::{AdmissionRequest, Operation},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::value::RawValue;

use crate::{
    Context, Error, MAX_BODY_BYTES, Outcome, Result, SkipReason,
    effects::Executor,
    ingress::mutate_ingress,
    metrics::Metrics,
    pod::{mutate_pod, pod_namespace},
    selection::{annotated_versions, has_selecting_service},
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
}

fn operation_label(op: &Operation) -> &'static str {
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
    let env: Envelope<'_> = serde_json::from_slice(body).map_err(|e| Error::InvalidReview(e.to_string()))?;
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

/// Serves reviews: pure mutation, then (unless dry run, and when it has a cluster) the side
/// effects, then the response.
#[derive(Clone)]
pub struct Reviewer {
    pub ctx: Context,
    pub metrics: Metrics,
    pub executor: Option<Executor>,
    /// Set after a failed live check ([`Reviewer::recheck_live`]).
    live_paused_until: Arc<Mutex<Option<Instant>>>,
}

/// Time budget for the live check of one Pod.
pub const LIVE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long live checks pause after one failed.
pub const LIVE_LOOKUP_PAUSE: Duration = Duration::from_secs(30);

impl Reviewer {
    pub fn new(ctx: Context, metrics: Metrics, executor: Option<Executor>) -> Self {
        Self {
            ctx,
            metrics,
            executor,
            live_paused_until: Arc::default(),
        }
    }

    /// The pure part of a review.
    pub fn mutate(&self, request: &Request) -> Outcome {
        match request {
            Request::Pod(r) => mutate_pod(r, &self.ctx),
            Request::Ingress(r) => mutate_ingress(r, &self.ctx),
            Request::Other { warning, .. } => Outcome::skip(SkipReason::UnknownKind).warn(warning.clone()),
        }
    }

    /// Reviews a body and returns the serialised AdmissionReview response. `Err` means the
    /// body is not an AdmissionReview ([`Error::InvalidReview`], [`Error::TooLarge`]).
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>> {
        let mut timer = self.metrics.timer();
        let request = parse(body)?;
        timer.kind = request.kind_label();
        timer.operation = operation_label(request.operation());
        let mut outcome = self.mutate(&request);
        // One budget for the review's API calls: the live check, then the side effects.
        let deadline = self.executor.as_ref().map(|e| Instant::now() + e.budget());
        if let (Request::Pod(pod), Some(exec)) = (&request, &self.executor) {
            let budget = exec.budget().min(LIVE_LOOKUP_TIMEOUT);
            outcome = self.recheck_live(pod, exec, budget, outcome).await;
        }
        let run_effects = !request.dry_run() && !outcome.effects.is_empty();
        if let Some(exec) = self.executor.as_ref().filter(|_| run_effects) {
            {
                let left = deadline.map_or(exec.budget(), |d| d.saturating_duration_since(Instant::now()));
                for (effect, err) in exec.apply(&outcome.effects, left).await {
                    tracing::warn!(uid = request.uid(), effect = effect.label(), error = %err, "side effect failed");
                    self.metrics
                        .side_effect_failures
                        .with_label_values(&[effect.label(), err.metric_label()])
                        .inc();
                    outcome.warnings.push(format!(
                        "sidecert: could not create {} ({err}); admitted anyway, the next admission retries",
                        effect.describe()
                    ));
                }
            }
        }
        self.count(&request, &outcome);
        timer.result = if outcome.patch.is_empty() {
            "unchanged"
        } else {
            "mutated"
        };
        let body = match &request {
            Request::Pod(r) => respond(r.as_ref(), outcome),
            Request::Ingress(r) => respond(r.as_ref(), outcome),
            Request::Other { request, .. } => respond(request.as_ref(), outcome),
        };
        if body.is_err() {
            timer.result = "error";
        }
        body
    }

    /// The watch caches lag the API server by a moment, so a Pod created right after its
    /// Ingress (one `kubectl apply`, a Deployment's first Pods) may be missed. A Pod the caches
    /// do not select, but which a cached Service selects (so an Ingress could), is checked
    /// against the API server: one list of the namespace's Ingresses, and a list of its
    /// Services only if its annotated Ingresses differ from the cached ones. The live answer
    /// is at least as fresh, so it wins. After a failed check, the cached answer stands and
    /// further checks pause for [`LIVE_LOOKUP_PAUSE`].
    async fn recheck_live(
        &self,
        req: &AdmissionRequest<Pod>,
        exec: &Executor,
        budget: Duration,
        cached: Outcome,
    ) -> Outcome {
        if !matches!(
            cached.skipped,
            Some(SkipReason::NotSelected | SkipReason::InvalidAnnotations)
        ) {
            return cached;
        }
        let Some(pod) = req.object.as_ref() else {
            return cached;
        };
        let namespace = pod_namespace(req);
        let lookup = self.ctx.lookup.as_ref();
        let no_labels = std::collections::BTreeMap::new();
        let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
        if !has_selecting_service(namespace, labels, lookup) {
            return cached;
        }
        let count = |result: &str| self.metrics.live_lookups.with_label_values(&[result]).inc();
        if self
            .live_paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until)
        {
            count("paused");
            return cached;
        }
        let known = annotated_versions(&lookup.ingresses(namespace));
        match exec.live_snapshot(namespace, &known, budget).await {
            Ok(None) => {
                count("cache_current");
                cached
            }
            Ok(Some(snapshot)) => {
                let ctx = Context {
                    lookup: Arc::new(snapshot),
                    ..self.ctx.clone()
                };
                let live = mutate_pod(req, &ctx);
                if live.patch.is_empty() {
                    count("not_selected");
                } else {
                    tracing::info!(
                        uid = req.uid,
                        namespace,
                        "Pod selected by an Ingress the watch cache had not seen yet"
                    );
                    count("selected");
                }
                live
            }
            Err(e) => {
                tracing::warn!(
                    uid = req.uid,
                    namespace,
                    error = %e,
                    pause = ?LIVE_LOOKUP_PAUSE,
                    "could not read the namespace from the API server; answering from the watch cache"
                );
                *self.live_paused_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + LIVE_LOOKUP_PAUSE);
                count(e.metric_label());
                cached
            }
        }
    }

    fn count(&self, request: &Request, outcome: &Outcome) {
        let kind = request.kind_label();
        if !outcome.patch.is_empty() {
            self.metrics.injections.with_label_values(&[kind]).inc();
        }
        if let Some(reason) = outcome.skipped {
            self.metrics.skips.with_label_values(&[reason.as_str()]).inc();
        }
        if !outcome.warnings.is_empty() {
            self.metrics
                .warnings
                .with_label_values(&[kind])
                .inc_by(outcome.warnings.len() as u64);
        }
    }
}

/// The AdmissionReview response. kube's `AdmissionResponse` writes the patch as an array of
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

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub reviewer: Reviewer,
    pub ready: Readiness,
}

/// What `/readyz` waits for: the Ingress and Service caches, and a served certificate the API
/// server trusts (always true with certificate files; see [`crate::selfsigned`]).
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    caches: Arc<AtomicBool>,
    certificate: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new(caches: bool, certificate: bool) -> Self {
        Self {
            caches: Arc::new(AtomicBool::new(caches)),
            certificate: Arc::new(AtomicBool::new(certificate)),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Shutting down: `/readyz` answers 503 from now on and every response closes its
    /// connection, while reviews are still served.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_caches(&self, ready: bool) {
        self.caches.store(ready, Ordering::Relaxed);
    }

    pub fn set_certificate(&self, ready: bool) {
        self.certificate.store(ready, Ordering::Relaxed);
    }

    pub fn certificate(&self) -> bool {
        self.certificate.load(Ordering::Relaxed)
    }

    /// `None` when ready, else what is missing.
    pub fn waiting_for(&self) -> Option<&'static str> {
        if self.draining() {
            return Some("shutting down");
        }
        match (
            self.caches.load(Ordering::Relaxed),
            self.certificate.load(Ordering::Relaxed),
        ) {
            (true, true) => None,
            (false, true) => Some("waiting for the Ingress and Service caches"),
            (true, false) => Some("waiting for the caBundle to trust the serving certificate"),
            (false, false) => Some(
                "waiting for the Ingress and Service caches and for the caBundle to trust the serving certificate",
            ),
        }
    }
}

async fn mutate(state: web::Data<AppState>, body: web::Bytes) -> HttpResponse {
    match state.reviewer.review(&body).await {
        Ok(json) => HttpResponse::Ok().content_type("application/json").body(json),
        Err(e @ Error::TooLarge(_)) => HttpResponse::PayloadTooLarge()
            .content_type("text/plain")
            .body(e.to_string()),
        Err(e @ Error::InvalidReview(_)) => HttpResponse::BadRequest()
            .content_type("text/plain")
            .body(e.to_string()),
        Err(e) => {
            // Only serialising our own response can fail here; still answer, never panic.
            tracing::error!(error = %e, "review failed");
            HttpResponse::BadRequest()
                .content_type("text/plain")
                .body(e.to_string())
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok")
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.ready.waiting_for() {
        None => HttpResponse::Ok().content_type("text/plain").body("ok"),
        Some(why) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(why),
    }
}

/// Middleware: while the server drains, every response carries `Connection: close`, so a
/// client that still reuses a kept-alive connection gets its answer and then a closed
/// connection, instead of a reset when the listener goes.
pub async fn close_when_draining(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let mut res = next.call(req).await?;
    if state.is_some_and(|s| s.ready.draining()) {
        res.response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
    }
    Ok(res)
}

/// The routes of the HTTPS server (`/mutate`, `/healthz`, `/readyz`).
pub fn routes(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(state)
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .route("/mutate", web::post().to(mutate))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz));
    }
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
