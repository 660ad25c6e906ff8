//! One certificate's life in this replica, as data: [`decide`] looks at the [`State`] and at
//! what was just [`Observed`] (the Secret, the Lease) and names the next [`Step`]; the
//! executor (`task.rs`) performs it and feeds the result back through the `State`'s
//! transition methods (a certificate adopted or issued, a write that failed, the failure
//! record a previous holder left, the ARI answer, an order that failed and how). Nothing here
//! does I/O or reads a clock: `now` and every random draw are parameters.
//!
//! The order of the checks in [`decide`] is the priority of the steps:
//!
//! 1. the Secret holds a newer real certificate than ours → [`Step::Adopt`] it;
//! 2. the Secret holds what we issued → [`Step::Settled`];
//! 3. we became (or stopped being) the holder of the Lease → [`Step::Lead`] / [`Step::Follow`];
//! 4. as the holder, the Secret lost our valid certificate → [`Step::Restore`] (at most every
//!    30 s);
//! 5. an issued certificate not yet written → [`Step::Write`] (leader or not), or
//!    [`Step::Backoff`] after a failed write;
//! 6. as the holder, no current ARI window → [`Step::AskAri`];
//! 7. as the holder, the order is due → [`Step::Order`];
//! 8. otherwise [`Step::Wait`] until the next moment something is due (or a change wakes us).

use std::{collections::BTreeMap, time::Duration};

use instant_acme::CertificateIdentifier;
use sidecert_runtime::Backoff;
use time::OffsetDateTime;

use super::{
    schedule::{self, Lifetime, ValidationLimiter, Window},
    x509::Held,
};

/// A certificate and key exactly as a Secret holds them (compared byte for byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub chain_pem: String,
    pub key_pem: String,
}

/// What the certificate's Secret holds, as far as the sidecar is concerned.
#[derive(Debug, Clone)]
pub enum SecretContents {
    /// No Secret.
    Absent,
    /// A temporary certificate (the webhook's placeholder).
    Temporary(Option<Pair>),
    /// Nothing usable for these domains: no pair, unreadable, expired, other domains, or a
    /// key that does not match.
    Broken(Option<Pair>),
    /// A real certificate for the domains, from the configured ACME server (or unsaid).
    Valid(Held),
    /// A real certificate for the domains from another ACME server (its issuer-url says so).
    Foreign(Held),
    /// A Secret that is not sidecert's ([`sidecert_contract::is_sidecerts_secret`]): another
    /// team's, whatever it holds. Never read for a certificate, never written, no order for it.
    NotOurs,
}

impl SecretContents {
    fn pair(&self) -> Option<(&str, &str)> {
        match self {
            Self::Absent | Self::NotOurs => None,
            Self::Temporary(p) | Self::Broken(p) => {
                p.as_ref().map(|p| (p.chain_pem.as_str(), p.key_pem.as_str()))
            }
            Self::Valid(h) | Self::Foreign(h) => Some((h.chain_pem.as_str(), h.key_pem.as_str())),
        }
    }

    /// True when the Secret holds exactly `held`'s chain and key.
    pub fn holds(&self, held: &Held) -> bool {
        self.pair() == Some((held.chain_pem.as_str(), held.key_pem.as_str()))
    }

    /// The real certificate for the domains, and whether it is from another ACME server.
    fn usable(&self) -> Option<(&Held, bool)> {
        match self {
            Self::Valid(h) => Some((h, false)),
            Self::Foreign(h) => Some((h, true)),
            _ => None,
        }
    }
}

/// What the executor saw at the start of this round.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub secret: &'a SecretContents,
    /// This replica holds the certificate's Lease.
    pub leader: bool,
}

/// What the holder of a certificate's Lease hands on about its failed orders (kept on the
/// Lease, so a new holder — another replica, a restarted Pod — keeps the backoff and the
/// CA's hourly limit on failed validations instead of starting afresh).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureRecord {
    /// Failed orders in a row.
    pub failures: u32,
    /// No order before this moment (unix seconds).
    pub not_before: i64,
    /// Failed validations per domain (unix seconds), at most the last five.
    pub validations: BTreeMap<String, Vec<i64>>,
}

/// How an order failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The CA could not validate these domains (empty: it did not say which); counts
    /// against its hourly limit.
    Validation { domains: Vec<String> },
    /// Anything else (network, CA errors, the Kubernetes API, ...).
    Other,
}

/// The CA's renewal window for the held certificate (ARI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ari {
    /// Not asked (yet, or since the certificate changed).
    Unknown,
    /// The window, and when to ask again.
    Known {
        window: Window,
        recheck_at: OffsetDateTime,
    },
    /// Asked and got no window (unsupported, or an error): the 1/3 rule applies until the
    /// next wake-up, when it is asked again.
    Unavailable,
}

/// The fixed inputs of one certificate.
#[derive(Debug, Clone)]
pub struct Settings {
    pub domains: Vec<String>,
    /// Use ARI when the CA offers it.
    pub ari: bool,
    /// The backoff between failed orders.
    pub retry: Backoff,
}

/// The state of one certificate in this replica. It outlives a failed loop: an issued
/// certificate not yet written, the failure count, the backoff and the validation limit all
/// carry over to the restart.
#[derive(Debug, Clone)]
pub struct State {
    pub settings: Settings,
    /// The certificate being served (from the Secret or fresh).
    pub held: Option<Held>,
    /// Issued but not yet in the Secret: kept in memory, never lost.
    pub unwritten: Option<Held>,
    /// The held certificate came from another ACME server than the configured one: replace
    /// it now rather than at its renewal time.
    pub foreign: bool,
    /// This replica held the Lease in the last round.
    pub leader: bool,
    pub failures: u32,
    pub write_failures: u32,
    /// No write of `unwritten` before this moment (after a failed write).
    pub write_retry_at: Option<OffsetDateTime>,
    /// No order before this moment (backoff, or spacing after an order).
    pub not_before: OffsetDateTime,
    pub limiter: ValidationLimiter,
    pub ari: Ari,
    /// The random draw for this certificate's renewal moment and write backoff.
    pub jitter: f64,
    /// Last write (or restore) of the Secret by this replica.
    pub last_write: Option<OffsetDateTime>,
    /// A certificate this replica issued: call the reload URL once the Secret holds it.
    pub reload_after_write: bool,
}

/// The next thing to do.
#[derive(Debug, Clone)]
pub enum Step {
    /// Take the Secret's certificate as ours (another holder's, or ours from before a
    /// restart); `reload` when it replaces one we held (the app must pick it up).
    Adopt { cert: Held, foreign: bool, reload: bool },
    /// The Secret holds the certificate we issued: nothing left to write.
    Settled,
    /// We hold the Lease now: read the failure record the last holder left, then
    /// [`State::lead`].
    Lead,
    /// We no longer hold the Lease: [`State::follow`].
    Follow,
    /// The Secret lost our certificate (deleted, overwritten by an older or temporary one):
    /// write it again ([`State::restore`]).
    Restore,
    /// Write an issued certificate into the Secret, with its renewal moment beside it.
    Write { cert: Held, renew_at: OffsetDateTime },
    /// A write failed: wait until then (only a shutdown interrupts), then try again.
    Backoff { until: OffsetDateTime },
    /// Ask the CA for the held certificate's renewal window ([`State::ari_answer`]).
    AskAri(CertificateIdentifier<'static>),
    /// Order now; `replaces` names the certificate this one renews (ARI).
    Order {
        replaces: Option<CertificateIdentifier<'static>>,
    },
    /// Nothing to do before `until` (a change of the Secret or of the Lease wakes earlier).
    Wait { until: OffsetDateTime },
    /// The Secret is someone else's: say so, and wait for it to change (handed over with
    /// sidecert's label, or deleted).
    NotOurs,
}

/// The next step for `state`, given what was just observed at `now`.
pub fn decide(st: &State, seen: &Observed<'_>, now: OffsetDateTime) -> Step {
    // 0. Another team's Secret: nothing is taken from it, written to it or ordered for it.
    if matches!(seen.secret, SecretContents::NotOurs) {
        return Step::NotOurs;
    }
    // 1. A newer real certificate in the Secret. Newer means issued later, not valid longer:
    //    a renewal on a shorter profile must not lose to the certificate it replaces.
    if let Some((cert, foreign)) = seen.secret.usable()
        && st.held.as_ref().is_none_or(|h| {
            h.chain_pem != cert.chain_pem && h.info.lifetime.not_before <= cert.info.lifetime.not_before
        })
    {
        return Step::Adopt {
            cert: cert.clone(),
            foreign,
            reload: st.held.is_some(),
        };
    }
    // 2. What we issued reached the Secret.
    if let (Some(u), Some(h)) = (&st.unwritten, &st.held)
        && u.chain_pem == h.chain_pem
        && seen.secret.holds(u)
    {
        return Step::Settled;
    }
    // 3. The Lease changed hands.
    if seen.leader != st.leader {
        return if seen.leader { Step::Lead } else { Step::Follow };
    }
    // 4. The holder restores a certificate the Secret lost, at most every 30 s.
    let lost = seen.leader
        && st.unwritten.is_none()
        && st
            .held
            .as_ref()
            .is_some_and(|h| now < h.info.lifetime.not_after && !seen.secret.holds(h));
    if lost && schedule::restore_allowed(st.last_write, now) {
        return Step::Restore;
    }
    // 5. A certificate we issued must reach the Secret, leader or not.
    if let Some(u) = &st.unwritten {
        if let Some(until) = st.write_retry_at
            && now < until
        {
            return Step::Backoff { until };
        }
        return Step::Write {
            cert: u.clone(),
            renew_at: st.renew_moment(&u.info.lifetime, now),
        };
    }
    // 6. The holder asks for the CA's window when it has none.
    if seen.leader
        && st.settings.ari
        && st.ari_wanted(now)
        && let Some(id) = st.held.as_ref().and_then(|h| h.info.ari_id.clone())
    {
        return Step::AskAri(id);
    }
    // 7. Is the next order due?
    let due = st.due(now);
    if seen.leader && due <= now {
        return Step::Order {
            replaces: st.replaces(),
        };
    }
    // 8. Wait for the due moment or a change.
    let restore = (lost)
        .then_some(st.last_write)
        .flatten()
        .map(schedule::restore_wake);
    let recheck = match st.ari {
        Ari::Known { recheck_at, .. } => Some(recheck_at),
        _ => None,
    };
    Step::Wait {
        until: schedule::wake_at(seen.leader, due, restore, recheck, now),
    }
}

impl State {
    /// A certificate nobody has looked at yet in this replica; `jitter` is a uniform draw in
    /// `[0, 1)`.
    pub fn new(settings: Settings, now: OffsetDateTime, jitter: f64) -> Self {
        Self {
            settings,
            held: None,
            unwritten: None,
            foreign: false,
            leader: false,
            failures: 0,
            write_failures: 0,
            write_retry_at: None,
            not_before: now,
            limiter: ValidationLimiter::default(),
            ari: Ari::Unknown,
            jitter,
            last_write: None,
            reload_after_write: false,
        }
    }

    fn window(&self) -> Option<Window> {
        match self.ari {
            Ari::Known { window, .. } => Some(window),
            _ => None,
        }
    }

    fn ari_wanted(&self, now: OffsetDateTime) -> bool {
        match self.ari {
            Ari::Unknown => true,
            Ari::Known { recheck_at, .. } => recheck_at <= now,
            Ari::Unavailable => false,
        }
    }

    /// When a certificate of `lifetime` is to be renewed (what the Secret's `renew-at` says).
    pub fn renew_moment(&self, lifetime: &Lifetime, now: OffsetDateTime) -> OffsetDateTime {
        schedule::plan(*lifetime, self.window(), now, self.jitter).renew_at
    }

    /// When the held certificate is to be renewed (now for a foreign one); none held, none.
    pub fn renew_at(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.held
            .as_ref()
            .map(|h| schedule::renew_at(h.info.lifetime, self.window(), self.foreign, now, self.jitter))
    }

    /// When the next order is due (see [`schedule::due`]).
    pub fn due(&self, now: OffsetDateTime) -> OffsetDateTime {
        schedule::due(
            self.renew_at(now),
            self.not_before,
            self.limiter.allowed_at(&self.settings.domains, now),
            now,
        )
    }

    /// `replaces` only where the CA offers ARI (it answered for this certificate) and for
    /// our own certificates.
    fn replaces(&self) -> Option<CertificateIdentifier<'static>> {
        if self.settings.ari && self.window().is_some() && !self.foreign {
            self.held.as_ref().and_then(|h| h.info.ari_id.clone())
        } else {
            None
        }
    }

    /// True while the Secret serves a valid certificate we hold (the `ready` gauge).
    pub fn serving(&self, secret: &SecretContents, now: OffsetDateTime) -> bool {
        self.held
            .as_ref()
            .is_some_and(|h| now < h.info.lifetime.not_after && secret.holds(h))
    }

    /// [`Step::Adopt`] done: another holder succeeded, so its backoff is over.
    pub fn adopt(&mut self, cert: Held, foreign: bool) {
        self.failures = 0;
        self.foreign = foreign;
        self.held = Some(cert);
        self.ari = Ari::Unknown;
    }

    /// [`Step::Settled`].
    pub fn settled(&mut self) {
        self.unwritten = None;
    }

    /// [`Step::Lead`] with the record the last holder left: carry on where it stopped
    /// (backoff and hourly limit).
    pub fn lead(&mut self, record: &FailureRecord) {
        self.leader = true;
        self.failures = self.failures.max(record.failures);
        if let Ok(t) = OffsetDateTime::from_unix_timestamp(record.not_before) {
            self.not_before = self.not_before.max(t);
        }
        self.limiter.merge(&record.validations);
    }

    /// [`Step::Follow`].
    pub fn follow(&mut self) {
        self.leader = false;
    }

    /// [`Step::Restore`]: the held certificate is to be written again.
    pub fn restore(&mut self) {
        self.unwritten = self.held.clone();
        self.write_retry_at = None;
    }

    /// [`Step::Write`] succeeded at `now`; true when the reload URL is to be called.
    pub fn written(&mut self, now: OffsetDateTime) -> bool {
        self.last_write = Some(now);
        self.unwritten = None;
        self.write_failures = 0;
        self.write_retry_at = None;
        std::mem::take(&mut self.reload_after_write)
    }

    /// [`Step::Write`] failed at `now`: the certificate stays in memory; returns the wait
    /// before the next try.
    pub fn write_failed(&mut self, now: OffsetDateTime) -> Duration {
        self.write_failures += 1;
        let at = schedule::write_retry_at(self.write_failures, self.jitter, now);
        self.write_retry_at = Some(at);
        schedule::delay_until(at, now)
    }

    /// [`Step::AskAri`] answered at `now`: the window and the CA's `Retry-After`, or none.
    pub fn ari_answer(&mut self, answer: Option<(Window, Duration)>, now: OffsetDateTime) {
        self.ari = match answer {
            Some((window, retry)) => Ari::Known {
                window,
                recheck_at: schedule::ari_recheck_at(retry, now),
            },
            None => Ari::Unavailable,
        };
    }

    /// After a wait or an order: a missing ARI window is asked for again.
    pub fn woke(&mut self) {
        if self.ari == Ari::Unavailable {
            self.ari = Ari::Unknown;
        }
    }

    /// [`Step::Order`] issued `cert` at `now`; `jitter` is a fresh draw for its renewal. The
    /// result is the record to leave on the Lease, if one is to be written: the backoff is
    /// over, the failed validations still count for the CA's hour.
    pub fn issued(&mut self, cert: Held, now: OffsetDateTime, jitter: f64) -> Option<FailureRecord> {
        let record = (self.failures > 0).then(|| FailureRecord {
            validations: self.limiter.to_record(),
            ..Default::default()
        });
        self.failures = 0;
        self.foreign = false;
        self.ari = Ari::Unknown;
        self.not_before = schedule::reorder_not_before(cert.info.lifetime, now);
        self.jitter = jitter;
        self.unwritten = Some(cert.clone());
        self.held = Some(cert);
        self.write_retry_at = None;
        // The directory now; the reload URL once the Secret holds it too.
        self.reload_after_write = true;
        self.woke();
        record
    }

    /// [`Step::Order`] failed at `now`, the order having started at `started`; `u` is a
    /// fresh draw for the backoff, `retry_after` the CA's `Retry-After` if it sent one.
    /// Returns the record to leave on the Lease and the wait before the next order.
    pub fn order_failed(
        &mut self,
        failure: &Failure,
        started: OffsetDateTime,
        now: OffsetDateTime,
        u: f64,
        retry_after: Option<OffsetDateTime>,
    ) -> (FailureRecord, Duration) {
        self.failures += 1;
        if let Failure::Validation { domains } = failure {
            // The CA did not say which: count it against every domain.
            let failed = if domains.is_empty() {
                &self.settings.domains
            } else {
                domains
            };
            for d in failed {
                self.limiter.record_failure(d, started);
            }
        }
        self.not_before = schedule::order_retry_at(self.settings.retry, self.failures, u, retry_after, now);
        self.woke();
        let record = FailureRecord {
            failures: self.failures,
            not_before: self.not_before.unix_timestamp(),
            validations: self.limiter.to_record(),
        };
        (record, schedule::delay_until(self.not_before, now))
    }

    /// [`Step::Order`] aborted because the Lease was lost: nothing is lost, nothing
    /// counts as a failure; the next holder orders.
    pub fn order_aborted(&mut self) {
        self.woke();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use time::{Duration as TD, macros::datetime};

    use super::*;
    use crate::certificate::{
        schedule::{RESTORE_GUARD, WRITE_BACKOFF},
        x509::CertInfo,
    };

    const T0: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);
    const DOMAIN: &str = "a.example";

    fn id(serial: &str) -> CertificateIdentifier<'static> {
        CertificateIdentifier {
            authority_key_identifier: "aki".into(),
            serial: serial.to_owned().into(),
        }
    }

    /// A certificate for [`DOMAIN`] named `serial`, valid from `not_before` for `days`.
    fn cert(serial: &str, not_before: OffsetDateTime, days: i64) -> Held {
        Held {
            chain_pem: format!("chain {serial}"),
            key_pem: format!("key {serial}"),
            info: CertInfo {
                lifetime: Lifetime {
                    not_before,
                    not_after: not_before + TD::days(days),
                },
                domains: BTreeSet::from([DOMAIN.to_owned()]),
                ari_id: Some(id(serial)),
                public_key: Vec::new(),
            },
        }
    }

    fn settings(ari: bool) -> Settings {
        Settings {
            domains: vec![DOMAIN.to_owned()],
            ari,
            retry: Backoff::new(Duration::from_secs(60), Duration::from_secs(4 * 3600)),
        }
    }

    fn state(ari: bool, now: OffsetDateTime) -> State {
        State::new(settings(ari), now, 0.5)
    }

    fn seen(secret: &SecretContents, leader: bool) -> Observed<'_> {
        Observed { secret, leader }
    }

    fn temporary() -> SecretContents {
        SecretContents::Temporary(Some(Pair {
            chain_pem: "temporary chain".into(),
            key_pem: "temporary key".into(),
        }))
    }

    /// Applies the steps that only change the state, as the executor does, until one that
    /// does I/O or waits; the Lease's failure record is empty.
    fn settle(st: &mut State, secret: &SecretContents, leader: bool, now: OffsetDateTime) -> Step {
        for _ in 0..10 {
            match decide(st, &seen(secret, leader), now) {
                Step::Adopt { cert, foreign, .. } => st.adopt(cert, foreign),
                Step::Settled => st.settled(),
                Step::Lead => st.lead(&FailureRecord::default()),
                Step::Follow => st.follow(),
                Step::Restore => st.restore(),
                other => return other,
            }
        }
        panic!("no step with I/O after ten state changes")
    }

    fn until(step: &Step) -> OffsetDateTime {
        match step {
            Step::Wait { until } | Step::Backoff { until } => *until,
            other => panic!("not a wait: {other:?}"),
        }
    }

    #[test]
    fn restart_with_a_valid_secret_adopts_it_and_orders_nothing() {
        let now = T0 + TD::days(1);
        let c1 = cert("1", T0, 90);
        let secret = SecretContents::Valid(c1.clone());
        let mut st = state(true, now);
        let Step::Adopt {
            cert,
            foreign,
            reload,
        } = decide(&st, &seen(&secret, true), now)
        else {
            panic!("the Secret's certificate is taken")
        };
        assert_eq!(cert.chain_pem, c1.chain_pem);
        assert!(!foreign);
        assert!(!reload, "the first certificate of this process needs no reload");
        st.adopt(cert, foreign);
        assert!(matches!(decide(&st, &seen(&secret, true), now), Step::Lead));
        st.lead(&FailureRecord::default());
        let Step::AskAri(asked) = decide(&st, &seen(&secret, true), now) else {
            panic!("the holder asks for the window")
        };
        assert_eq!(asked, id("1"));
        st.ari_answer(None, now);
        // No order: the holder sleeps until the 1/3 point, at most 6 h at a time.
        let step = decide(&st, &seen(&secret, true), now);
        assert_eq!(until(&step), now + schedule::LEADER_MAX_SLEEP);
        assert!(st.serving(&secret, now));
        assert_eq!(
            st.renew_at(now),
            Some(schedule::plan(c1.info.lifetime, None, now, 0.5).renew_at)
        );
        // A follower with the same Secret does nothing either.
        let mut follower = state(true, now);
        let step = settle(&mut follower, &secret, false, now);
        assert_eq!(until(&step), now + schedule::FOLLOWER_SLEEP);
    }

    #[test]
    fn no_certificate_the_holder_orders_at_once_a_follower_waits() {
        for secret in [SecretContents::Absent, temporary(), SecretContents::Broken(None)] {
            let mut st = state(true, T0);
            let step = settle(&mut st, &secret, true, T0);
            assert!(matches!(step, Step::Order { replaces: None }), "{step:?}");
            let mut follower = state(true, T0);
            let step = settle(&mut follower, &secret, false, T0);
            assert_eq!(until(&step), T0 + schedule::FOLLOWER_SLEEP);
        }
    }

    #[test]
    fn another_teams_secret_gets_no_order_and_no_write() {
        // The holder, with nothing yet, and with an issued certificate still to write.
        let mut st = state(true, T0);
        assert!(matches!(
            decide(&st, &seen(&SecretContents::NotOurs, true), T0),
            Step::NotOurs
        ));
        st.lead(&FailureRecord::default());
        st.issued(cert("1", T0, 90), T0, 0.5);
        assert!(matches!(
            decide(&st, &seen(&SecretContents::NotOurs, true), T0),
            Step::NotOurs
        ));
        assert!(!st.serving(&SecretContents::NotOurs, T0));
    }

    #[test]
    fn a_foreign_certificate_is_replaced_now() {
        let now = T0 + TD::days(1);
        let secret = SecretContents::Foreign(cert("1", T0, 90));
        let mut st = state(true, now);
        assert!(matches!(
            decide(&st, &seen(&secret, true), now),
            Step::Adopt { foreign: true, .. }
        ));
        let step = settle(&mut st, &secret, true, now);
        assert!(matches!(step, Step::AskAri(_)));
        // Even with a window from the CA, a foreign certificate is not `replaces`d ...
        let window = Window {
            start: T0 + TD::days(60),
            end: T0 + TD::days(62),
        };
        st.ari_answer(Some((window, Duration::from_secs(3600))), now);
        assert!(st.foreign);
        assert_eq!(
            st.renew_at(now),
            Some(now),
            "replaced now, not at its renewal time"
        );
        let step = decide(&st, &seen(&secret, true), now);
        assert!(matches!(step, Step::Order { replaces: None }), "{step:?}");
        // ... and once ours is issued, it is ours again.
        st.issued(cert("2", now, 90), now, 0.5);
        assert!(!st.foreign);
    }

    #[test]
    fn an_issued_certificate_not_yet_written_is_written_not_reordered() {
        let now = T0;
        let secret = temporary();
        let mut st = state(false, now);
        assert!(matches!(settle(&mut st, &secret, true, now), Step::Order { .. }));
        let c1 = cert("1", now, 90);
        assert_eq!(
            st.issued(c1.clone(), now, 0.25),
            None,
            "no failures: no record to write"
        );
        let Step::Write { cert, renew_at } = settle(&mut st, &secret, true, now) else {
            panic!("written first")
        };
        assert_eq!(cert.chain_pem, c1.chain_pem);
        assert_eq!(
            renew_at,
            schedule::plan(c1.info.lifetime, None, now, 0.25).renew_at
        );
        // The write fails: it is retried after the write backoff, never re-ordered ...
        let wait = st.write_failed(now);
        assert_eq!(wait, WRITE_BACKOFF.jittered(1, 0.25));
        let step = settle(&mut st, &secret, true, now + TD::seconds(1));
        assert_eq!(until(&step), now + wait);
        // ... by the holder, and by a replica that lost the Lease meanwhile.
        let later = now + wait;
        assert!(matches!(
            settle(&mut st, &secret, false, later),
            Step::Write { .. }
        ));
        assert!(!st.leader);
        assert!(
            st.written(later),
            "our own certificate: the reload URL is called once"
        );
        assert!(!st.written(later));
        let written = SecretContents::Valid(c1.clone());
        let step = settle(&mut st, &written, true, later);
        assert!(matches!(step, Step::Wait { .. }), "nothing to order: {step:?}");
    }

    #[test]
    fn an_issued_certificate_the_secret_already_holds_is_settled() {
        let mut st = state(false, T0);
        let c1 = cert("1", T0, 90);
        st.issued(c1.clone(), T0, 0.5);
        let step = decide(&st, &seen(&SecretContents::Valid(c1), true), T0);
        assert!(matches!(step, Step::Settled), "{step:?}");
    }

    #[test]
    fn lease_lost_mid_order_hands_over_and_loses_nothing() {
        // The held certificate is near its end: the holder orders ...
        let c0 = cert("0", T0 - TD::days(89), 90);
        let secret = SecretContents::Valid(c0.clone());
        let mut st = state(false, T0);
        assert!(matches!(settle(&mut st, &secret, true, T0), Step::Order { .. }));
        let before = st.clone();
        // ... and loses the Lease before the CA answers: the order is aborted.
        st.order_aborted();
        assert_eq!(st.failures, before.failures, "an aborted order is no failure");
        assert_eq!(st.not_before, before.not_before);
        assert_eq!(st.held.as_ref().map(|h| &h.chain_pem), Some(&c0.chain_pem));
        assert!(st.unwritten.is_none());
        assert!(
            st.serving(&secret, T0),
            "the Secret keeps serving the old certificate"
        );
        let later = T0 + TD::seconds(1);
        assert!(matches!(decide(&st, &seen(&secret, false), later), Step::Follow));
        st.follow();
        assert_eq!(
            until(&decide(&st, &seen(&secret, false), later)),
            later + schedule::FOLLOWER_SLEEP
        );
        // The new holder carries on where this one stopped.
        let mut next = state(false, later);
        let record = FailureRecord {
            failures: 3,
            not_before: (later + TD::minutes(10)).unix_timestamp(),
            validations: BTreeMap::new(),
        };
        let Step::Adopt { cert, foreign, .. } = decide(&next, &seen(&secret, true), later) else {
            panic!("the Secret's certificate is taken first")
        };
        next.adopt(cert, foreign);
        assert!(matches!(decide(&next, &seen(&secret, true), later), Step::Lead));
        next.lead(&record);
        assert_eq!(next.failures, 3);
        let step = settle(&mut next, &secret, true, later);
        assert_eq!(until(&step), later + TD::minutes(10));
        let step = settle(&mut next, &secret, true, later + TD::minutes(10));
        assert!(matches!(step, Step::Order { .. }), "{step:?}");
    }

    #[test]
    fn ari_window_moved_renew_at_follows_it() {
        let now = T0 + TD::days(1);
        let c1 = cert("1", T0, 90);
        let secret = SecretContents::Valid(c1.clone());
        let mut st = state(true, now);
        assert!(matches!(settle(&mut st, &secret, true, now), Step::AskAri(_)));
        let first = Window {
            start: T0 + TD::days(60),
            end: T0 + TD::days(62),
        };
        st.ari_answer(Some((first, Duration::from_secs(3600))), now);
        assert_eq!(st.renew_at(now), Some(T0 + TD::days(61)));
        // Asked again when the CA said (Retry-After, at least 10 s).
        let step = decide(&st, &seen(&secret, true), now);
        assert_eq!(until(&step), now + TD::hours(1));
        let later = now + TD::hours(1);
        assert!(matches!(
            decide(&st, &seen(&secret, true), later),
            Step::AskAri(_)
        ));
        let moved = Window {
            start: T0 + TD::days(30),
            end: T0 + TD::days(32),
        };
        st.ari_answer(Some((moved, Duration::ZERO)), later);
        assert_eq!(st.renew_at(later), Some(T0 + TD::days(31)));
        let step = decide(&st, &seen(&secret, true), later);
        assert_eq!(
            until(&step),
            later + TD::seconds(10),
            "a recheck is at least 10 s away"
        );
        // A window moved into the past (the CA wants it replaced, e.g. revoked): now, with
        // `replaces`.
        let past = Window {
            start: T0,
            end: T0 + TD::hours(1),
        };
        let recheck = later + TD::seconds(10);
        st.ari_answer(Some((past, Duration::from_secs(3600))), recheck);
        let step = decide(&st, &seen(&secret, true), recheck);
        assert!(
            matches!(&step, Step::Order { replaces: Some(r) } if *r == id("1")),
            "{step:?}"
        );
        // No window (unsupported): the 1/3 rule until the next wake-up asks again.
        st.ari_answer(None, recheck);
        assert_eq!(
            st.renew_at(recheck),
            Some(schedule::plan(c1.info.lifetime, None, recheck, 0.5).renew_at)
        );
        assert!(matches!(
            decide(&st, &seen(&secret, true), recheck),
            Step::Wait { .. }
        ));
        st.woke();
        assert!(matches!(
            decide(&st, &seen(&secret, true), recheck),
            Step::AskAri(_)
        ));
    }

    #[test]
    fn emergency_renewal_orders_now() {
        let c1 = cert("1", T0, 90);
        let secret = SecretContents::Valid(c1.clone());
        // Near expiry, with the CA's window after it: the emergency point wins.
        let now = T0 + TD::days(88);
        let mut st = state(true, now);
        settle(&mut st, &secret, true, now);
        let late = Window {
            start: T0 + TD::days(89),
            end: T0 + TD::days(95),
        };
        st.ari_answer(Some((late, Duration::from_secs(3600))), now);
        assert!(matches!(
            decide(&st, &seen(&secret, true), now),
            Step::Order { .. }
        ));
        // Expired: the Secret's certificate is not valid any more, nothing is held.
        let mut st = state(false, now);
        let expired = SecretContents::Broken(Some(Pair {
            chain_pem: c1.chain_pem.clone(),
            key_pem: c1.key_pem.clone(),
        }));
        assert!(matches!(
            settle(&mut st, &expired, true, now),
            Step::Order { replaces: None }
        ));
        // Held but expired meanwhile: ordered, not restored.
        let mut st = state(false, T0);
        st.adopt(c1.clone(), false);
        st.lead(&FailureRecord::default());
        let after = T0 + TD::days(91);
        assert!(matches!(
            decide(&st, &seen(&SecretContents::Absent, true), after),
            Step::Order { .. }
        ));
    }

    #[test]
    fn backoff_after_the_hourly_validation_limit_waits_for_the_oldest_failure() {
        let secret = temporary();
        let mut st = State::new(
            Settings {
                retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(2)),
                ..settings(false)
            },
            T0,
            0.5,
        );
        let mut now = T0;
        for i in 0..5 {
            let step = settle(&mut st, &secret, true, now);
            assert!(matches!(step, Step::Order { .. }), "attempt {i}: {step:?}");
            // The CA did not say which domain failed: every domain counts.
            let (record, wait) =
                st.order_failed(&Failure::Validation { domains: vec![] }, now, now, 1.0, None);
            assert_eq!(record.failures, i + 1);
            assert_eq!(record.validations[DOMAIN].len(), (i + 1) as usize);
            assert!(wait <= Duration::from_secs(2));
            now += TD::minutes(1);
        }
        // Five failed validations within the hour: no order before the oldest leaves it.
        let step = settle(&mut st, &secret, true, now);
        assert_eq!(until(&step), T0 + TD::HOUR);
        let step = settle(&mut st, &secret, true, T0 + TD::HOUR);
        assert!(matches!(step, Step::Order { .. }), "{step:?}");
        // A success ends the backoff but hands the validations on.
        let record = st
            .issued(cert("1", T0 + TD::HOUR, 90), T0 + TD::HOUR, 0.5)
            .unwrap();
        assert_eq!(record.failures, 0);
        assert_eq!(record.validations[DOMAIN].len(), 5);
        assert_eq!(st.failures, 0);
    }

    #[test]
    fn a_failed_order_backs_off_and_retry_after_wins_when_later() {
        let secret = temporary();
        let mut st = state(false, T0);
        settle(&mut st, &secret, true, T0);
        let (record, wait) = st.order_failed(&Failure::Other, T0, T0, 1.0, None);
        assert_eq!(wait, Duration::from_secs(60));
        assert_eq!(record.not_before, (T0 + TD::minutes(1)).unix_timestamp());
        assert!(record.validations.is_empty(), "no validation failed");
        assert_eq!(until(&settle(&mut st, &secret, true, T0)), T0 + TD::minutes(1));
        let now = T0 + TD::minutes(1);
        assert!(matches!(settle(&mut st, &secret, true, now), Step::Order { .. }));
        let (_, wait) = st.order_failed(&Failure::Other, now, now, 0.0, Some(now + TD::minutes(10)));
        assert_eq!(
            wait,
            Duration::from_secs(600),
            "the CA's Retry-After is later than 60 s"
        );
        assert_eq!(st.failures, 2);
    }

    #[test]
    fn a_secret_that_lost_the_certificate_is_restored_at_most_every_30s() {
        let c1 = cert("1", T0, 90);
        let mut st = state(false, T0);
        st.adopt(c1.clone(), false);
        st.lead(&FailureRecord::default());
        assert!(!st.written(T0), "a restored certificate is no new one: no reload");
        assert_eq!(st.last_write, Some(T0));
        let now = T0 + TD::seconds(10);
        let step = decide(&st, &seen(&SecretContents::Absent, true), now);
        assert_eq!(until(&step), schedule::restore_wake(T0));
        let now = T0 + RESTORE_GUARD + TD::seconds(1);
        assert!(matches!(
            decide(&st, &seen(&temporary(), true), now),
            Step::Restore
        ));
        st.restore();
        assert!(matches!(
            decide(&st, &seen(&temporary(), true), now),
            Step::Write { .. }
        ));
        // Only the holder restores.
        let mut follower = state(false, T0);
        follower.adopt(c1, false);
        let step = decide(&follower, &seen(&SecretContents::Absent, false), now);
        assert_eq!(until(&step), now + schedule::FOLLOWER_SLEEP);
    }

    #[test]
    fn a_newer_certificate_is_adopted_an_older_one_is_not() {
        let c2 = cert("2", T0 + TD::days(30), 90);
        let mut st = state(false, T0 + TD::days(31));
        st.adopt(c2.clone(), false);
        st.lead(&FailureRecord::default());
        st.failures = 2;
        let now = T0 + TD::days(31);
        // Older (issued before ours), though valid longer: not taken; the holder restores ours.
        let older = SecretContents::Valid(cert("1", T0, 180));
        assert!(matches!(decide(&st, &seen(&older, true), now), Step::Restore));
        // Newer (another holder renewed): taken, its backoff is over, the app reloads.
        let newer = cert("3", T0 + TD::days(31), 6);
        let step = decide(&st, &seen(&SecretContents::Valid(newer.clone()), true), now);
        let Step::Adopt { cert, reload, .. } = step else {
            panic!("the newer certificate is taken")
        };
        assert!(reload);
        st.adopt(cert, false);
        assert_eq!(st.failures, 0);
        assert_eq!(st.held.map(|h| h.chain_pem), Some(newer.chain_pem));
    }

    #[test]
    fn reorders_after_a_success_are_spaced() {
        // A CA whose window always says "now" (RFC 9773: a window in the past): no tight
        // loop, the next order waits a tenth of the lifetime (12 s of 120 s).
        let mut st = state(true, T0);
        let short = Held {
            info: CertInfo {
                lifetime: Lifetime {
                    not_before: T0,
                    not_after: T0 + TD::seconds(120),
                },
                ..cert("1", T0, 1).info
            },
            ..cert("1", T0, 1)
        };
        st.lead(&FailureRecord::default());
        st.issued(short.clone(), T0, 0.0);
        st.written(T0);
        let secret = SecretContents::Valid(short);
        let now = T0 + TD::seconds(1);
        assert!(matches!(settle(&mut st, &secret, true, now), Step::AskAri(_)));
        let past = Window {
            start: T0 - TD::seconds(10),
            end: T0,
        };
        st.ari_answer(Some((past, Duration::from_secs(3600))), now);
        assert_eq!(st.renew_at(now), Some(now));
        let step = settle(&mut st, &secret, true, now);
        assert_eq!(until(&step), T0 + TD::seconds(12));
        let step = settle(&mut st, &secret, true, T0 + TD::seconds(12));
        assert!(matches!(step, Step::Order { replaces: Some(_) }), "{step:?}");
    }
}
