//! Reservations: `jobgate launch` asks, right after `sbatch` returns, for the name the
//! job's session will have, so the user gets the final URL at submit time.
//!
//! A reservation is stateless on the relay's side: a signed statement (the resume key,
//! kept on disk, so it survives a restart) that name N, with access key hash K, belongs
//! to user U for batch job J until time T. The job's agent presents it in its first
//! `Hello`; the relay gives the name only to an agent of the same user that runs in the
//! same job, while the name has not ended. A session that ends with `Bye` marks its name
//! ended (persisted in the state file), so the reservation cannot be replayed after the
//! job is over.

use crate::access::SessionLock;
use crate::agents::Refusal;
use crate::ticket::{valid_job_id, ReservationClaims, TicketClaims};
use crate::tokens::Identity;
use crate::Shared;
use jobgate_protocol::{AccessMode, ControlMessage, JobInfo, RefusalCode, Token};
use std::time::Instant;

/// How long a reservation holds its name: a queue wait plus the longest job a site
/// runs. Generous, because the name also ends for good with the job's `Bye`.
pub const RESERVATION_LIFETIME_SECS: u64 = 14 * 24 * 3600;

/// Answers a `Reserve` from `identity`: a fresh name held for `job_id`.
pub(crate) fn reserve(
    shared: &Shared,
    identity: &Identity,
    access: AccessMode,
    job_id: &str,
) -> Result<ControlMessage, Refusal> {
    if !valid_job_id(job_id) {
        return Err(Refusal::new(
            RefusalCode::Malformed,
            "a reservation needs the batch job id sbatch printed (letters, digits, _ . - [ ])",
        )
        .for_user(&identity.user));
    }
    // A reserved name is a new name: it counts against the user's rate like one.
    if let Err(wait) = shared.new_sessions.try_take(&identity.user, Instant::now()) {
        return Err(crate::agents::rate_limited(shared, &identity.user, wait));
    }
    let (key_hash, key) = match access {
        AccessMode::Public if !shared.config.allow_public => {
            return Err(Refusal::new(
                RefusalCode::AccessModeNotAllowed,
                "this relay does not allow public sessions: use the default private link (--access link)",
            )
            .for_user(&identity.user))
        }
        AccessMode::Owner if !shared.config.access_allowed(AccessMode::Owner) => {
            return Err(Refusal::new(
                RefusalCode::AccessModeNotAllowed,
                "this relay has no single sign-on: owner sessions need it (use --access link)",
            )
            .for_user(&identity.user))
        }
        AccessMode::Public | AccessMode::Owner => (None, None),
        AccessMode::Link => match SessionLock::new_link() {
            (SessionLock::Link { key_hash }, key) => (Some(key_hash), Some(key)),
            (_, _) => (None, None),
        },
    };
    let name = shared.names.issue();
    let claims = ReservationClaims {
        ticket: TicketClaims {
            name,
            user: identity.user.clone(),
            key_hash,
            expires: crate::agents::unix_now().saturating_add(RESERVATION_LIFETIME_SECS),
        },
        job_id: job_id.to_owned(),
    };
    let Some(reservation) = shared.tickets.issue_reservation(&claims) else {
        return Err(Refusal::new(RefusalCode::Malformed, "invalid job id").for_user(&identity.user));
    };
    let url = shared.config.session_url(name.as_str());
    let lock = match (key_hash, access) {
        (Some(key_hash), _) => SessionLock::Link { key_hash },
        (None, AccessMode::Owner) => SessionLock::Owner,
        (None, _) => SessionLock::Public,
    };
    shared
        .queued
        .insert(name, &identity.user, job_id, lock, claims.ticket.expires);
    crate::cluster::claim_queued(shared, name);
    tracing::info!(%name, user = %identity.user, job = job_id, "name reserved for a queued job");
    Ok(ControlMessage::Reserved {
        name: name.to_string(),
        access_url: match key {
            Some(key) => format!("{url}?{}={key}", crate::access::KEY_PARAM),
            None => url.clone(),
        },
        url,
        reservation: Token(reservation),
    })
}

/// The claims of `reservation` if `user`'s agent in `job` may have its name now, or a
/// refusal that tells the user exactly why not.
pub(crate) fn check(
    shared: &Shared,
    reservation: &Token,
    user: &str,
    job: &JobInfo,
    access: Option<AccessMode>,
) -> Result<TicketClaims, Refusal> {
    let refuse =
        |message: String| Err(Refusal::new(RefusalCode::BadReservation, message).for_user(user));
    let Some(claims) = shared.tickets.verify_reservation(&reservation.0) else {
        return refuse(
            "the reservation is not one this relay signed (damaged, forged, or from another relay)"
                .into(),
        );
    };
    // The signature is checked; comparing the fields it covers leaks nothing secret.
    if claims.ticket.user != user {
        return refuse(format!(
            "the reservation belongs to another user, not to {user}: each job needs its owner's token"
        ));
    }
    if job.id.as_deref() != Some(claims.job_id.as_str()) {
        return refuse(format!(
            "the reservation is for job {}, but this agent runs in job {}",
            claims.job_id,
            job.id.as_deref().unwrap_or("(none)")
        ));
    }
    if shared.names.is_ended(&claims.ticket.name) {
        return refuse(format!(
            "job {}'s session has ended: its reservation cannot be used again",
            claims.job_id
        ));
    }
    if claims.ticket.expires <= crate::agents::unix_now() {
        return refuse(format!(
            "the reservation for job {} has expired",
            claims.job_id
        ));
    }
    // Without a key the reservation was for `public` or `owner`: an agent naming no mode
    // gets the stricter `owner` where the relay signs users on.
    let fits_access = match (access, claims.ticket.key_hash) {
        (None | Some(AccessMode::Link), Some(_)) => true,
        (Some(AccessMode::Owner), None) => shared.config.access_allowed(AccessMode::Owner),
        (Some(AccessMode::Public), None) => shared.config.allow_public,
        (None, None) => true,
        _ => false,
    };
    if !fits_access {
        return refuse(
            "the reservation was made for another access mode than the agent asks for".into(),
        );
    }
    Ok(claims.ticket)
}
