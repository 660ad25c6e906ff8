//! `sidecert-sidecar issue` against a real Pebble.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::Ipv4Addr,
    process::{Command, Output},
};

use common::*;

/// Runs the binary's `issue` and checks that it succeeded.
fn run_issue(
    directory: &str,
    ca_file: &std::path::Path,
    domains: &[String],
    ip: Ipv4Addr,
    extra: &[&str],
) -> std::path::PathBuf {
    let (out, dir) = issue_output(directory, ca_file, domains, ip, extra);
    assert!(
        out.status.success(),
        "issue failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Runs the binary's `issue` into a fresh directory; returns what it printed and the directory.
fn issue_output(
    directory: &str,
    ca_file: &std::path::Path,
    domains: &[String],
    ip: Ipv4Addr,
    extra: &[&str],
) -> (Output, std::path::PathBuf) {
    let dir = temp_dir("issue");
    let out = Command::new(bin())
        .args([
            "issue",
            "--domains",
            &domains.join(","),
            "--acme-server",
            directory,
            "--acme-ca-file",
            &ca_file.display().to_string(),
            "--cert-dir",
            &dir.display().to_string(),
            "--http01-listen",
            &format!("{ip}:8089"),
        ])
        .args(extra)
        .output()
        .unwrap();
    (out, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn issue_against_a_nonce_rejecting_pebble() {
    init();
    let pebble = OwnPebble::start(14100, &[("PEBBLE_WFE_NONCEREJECT", "50")], true);
    pebble.wait_ready().await;
    let ip = Ipv4Addr::new(127, 0, 0, 41);
    let domains = vec![domain("nonce-a"), domain("nonce-b")];
    for d in &domains {
        add_a(&pebble.challtestsrv, d, ip).await;
    }
    let (directory, ca) = (pebble.directory.clone(), pebble.ca_file.clone());
    let ds = domains.clone();
    let dir = tokio::task::spawn_blocking(move || {
        run_issue(&directory, &ca, &ds, ip, &["--key-algorithm", "ecdsa-p384"])
    })
    .await
    .unwrap();
    let chain = std::fs::read_to_string(dir.join("tls.crt")).unwrap();
    let key = std::fs::read_to_string(dir.join("tls.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let mut sorted = domains.clone();
    sorted.sort();
    assert_chains_to(&chain, &pebble.root_pem().await, &sorted);
}

#[tokio::test(flavor = "multi_thread")]
async fn issue_fails_clearly_when_nobody_answers() {
    init();
    let pebble = OwnPebble::start(14110, &[], true);
    pebble.wait_ready().await;
    let d = domain("nobody");
    // Nothing listens on 127.0.0.42:8089 but the responder binds elsewhere.
    add_a(&pebble.challtestsrv, &d, Ipv4Addr::new(127, 0, 0, 42)).await;
    let dir = temp_dir("issue-fail");
    let out = tokio::task::spawn_blocking({
        let (directory, ca, dir) = (pebble.directory.clone(), pebble.ca_file.clone(), dir.clone());
        move || {
            Command::new(bin())
                .args([
                    "issue",
                    "--domains",
                    &d,
                    "--acme-server",
                    &directory,
                    "--acme-ca-file",
                    &ca.display().to_string(),
                    "--cert-dir",
                    &dir.display().to_string(),
                    "--http01-listen",
                    "127.0.0.43:8089",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("validation failed"), "{err}");
    assert!(!dir.join("tls.crt").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn issue_against_the_plane_pebble_with_an_rsa_key() {
    init();
    let plane = sidecert_e2e::Plane::get().await.unwrap();
    let ip = Ipv4Addr::new(127, 0, 0, 44);
    let d = domain("issue-rsa");
    plane.add_a(&d, ip).await.unwrap();
    let (directory, ca) = (
        plane.pebble_directory().to_owned(),
        plane.pebble_ca_file().to_owned(),
    );
    let ds = vec![d.clone()];
    let dir = tokio::task::spawn_blocking(move || {
        run_issue(
            &directory,
            &ca,
            &ds,
            ip,
            &["--key-algorithm", "rsa-2048", "--acme-profile", "default"],
        )
    })
    .await
    .unwrap();
    let chain = std::fs::read_to_string(dir.join("tls.crt")).unwrap();
    assert!(chain.matches("BEGIN CERTIFICATE").count() >= 2, "leaf and chain");
    assert_chains_to(&chain, &plane.pebble_root_pem().await.unwrap(), &[d]);
    let key = std::fs::read_to_string(dir.join("tls.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    // The top-level files are links through the swapped `..data`.
    assert!(
        std::fs::symlink_metadata(dir.join("tls.crt"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// The HMAC key Pebble's own example configuration uses (base64url).
const EAB_HMAC: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

#[tokio::test(flavor = "multi_thread")]
async fn issue_binds_the_account_when_the_ca_requires_eab() {
    init();
    let pebble = OwnPebble::start_requiring_eab(14130, &[("kid-sidecert", EAB_HMAC)]);
    pebble.wait_ready().await;
    let ip = Ipv4Addr::new(127, 0, 0, 45);
    let d = domain("eab");
    add_a(&pebble.challtestsrv, &d, ip).await;
    let (directory, ca) = (pebble.directory.clone(), pebble.ca_file.clone());
    let domains = vec![d];
    let outcome = tokio::task::spawn_blocking(move || {
        let without = issue_output(&directory, &ca, &domains, ip, &[]);
        let wrong_key = issue_output(
            &directory,
            &ca,
            &domains,
            ip,
            &[
                "--eab-key-id",
                "kid-sidecert",
                "--eab-hmac-key",
                "bm90LXRoZS1rZXk",
            ],
        );
        let with = issue_output(
            &directory,
            &ca,
            &domains,
            ip,
            &["--eab-key-id", "kid-sidecert", "--eab-hmac-key", EAB_HMAC],
        );
        (without, wrong_key, with, domains)
    })
    .await
    .unwrap();
    let ((without, without_dir), (wrong, wrong_dir), (with, dir), domains) = outcome;

    // No binding: the CA's problem reaches the user with what to do, and nothing is written.
    assert!(!without.status.success());
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(err.contains("externalAccountRequired"), "{err}");
    assert!(err.contains("--eab-key-id"), "{err}");
    assert!(!without_dir.join("tls.crt").exists());
    // A binding signed with the wrong key is refused just as clearly.
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("unauthorized"), "{err}");
    assert!(!wrong_dir.join("tls.crt").exists());
    // The right key: issued.
    assert!(with.status.success(), "{}", String::from_utf8_lossy(&with.stderr));
    let chain = std::fs::read_to_string(dir.join("tls.crt")).unwrap();
    assert_chains_to(&chain, &pebble.root_pem().await, &domains);
}
