//! The pure Pod mutation on a realistic review (~9 KB with managedFields): parse once into
//! typed structs, mutate, serialise the response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use sidecert_webhook::{
    AcmeDefaults, Context, Reviewer, SidecarSettings,
    admission::{Request, parse, respond},
    metrics::Metrics,
    mutate::Snapshot,
};

fn bench(c: &mut Criterion) {
    let body = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pod-bench.json")).unwrap();
    let ctx = Context {
        sidecar: SidecarSettings::default(),
        acme: AcmeDefaults::default(),
        lookup: Arc::new(Snapshot::default()),
        secrets: Default::default(),
        hosts: Default::default(),
    };
    let reviewer = Reviewer::new(ctx, Metrics::new().unwrap(), None);
    let request = parse(&body).unwrap();
    assert!(!reviewer.mutate(&request).patch.is_empty());

    c.bench_function("parse pod review", |b| {
        b.iter(|| parse(black_box(&body)).unwrap())
    });
    c.bench_function("mutate pod", |b| b.iter(|| reviewer.mutate(black_box(&request))));
    c.bench_function("parse + mutate + respond", |b| {
        b.iter(|| {
            let request = parse(black_box(&body)).unwrap();
            let outcome = reviewer.mutate(&request);
            match &request {
                Request::Pod(r) => respond(r.as_ref(), outcome).unwrap(),
                _ => unreachable!(),
            }
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    c.bench_function("Reviewer::review (with metrics)", |b| {
        b.iter(|| rt.block_on(reviewer.review(black_box(&body))).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
