//! Conversions between database rows and the port types, and from database errors to
//! [`StoreError`]. Nothing of sea-orm leaves this crate.

use std::ops::Deref;

use batch_domain::run::{Lease, RunId};
use batch_domain::{JobId, Priority, TenantId, UserId};
use batch_ports::runs::{ItemRecord, RunRecord, StoreError};
use chrono::{DateTime, Utc};
use sea_orm::{DbErr, QueryResult, RuntimeErr, Value, sqlx};

/// Maps a database error to the store's error: connection trouble is `Unavailable` (retry
/// later), everything else `Unexpected`.
pub fn db_error(error: DbErr) -> StoreError {
    let unavailable = match &error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.deref() {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_)
                | sqlx::Error::Tls(_) => true,
                // Class 08 (connection exception) and 57P01–57P03 (server shutting down or
                // starting) in PostgreSQL.
                sqlx::Error::Database(db) => db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
                _ => false,
            }
        }
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(error.to_string())
    } else if matches!(
        error.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    ) {
        StoreError::AlreadyExists(error.to_string())
    } else {
        StoreError::Unexpected(error.to_string())
    }
}

/// Maps a database error to a data-source error (see [`db_error`]).
pub(crate) fn source_error(error: DbErr) -> batch_ports::SourceError {
    db_error(error).into()
}

/// Milliseconds since the epoch, the stored form of instants.
pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// An instant from its stored form.
pub(crate) fn instant(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Unexpected(format!("{ms} is not a storable instant")))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unexpected(format!("stored {what} is invalid: {e}"))
}

fn get<T: sea_orm::TryGetable>(row: &QueryResult, column: &str) -> Result<T, StoreError> {
    row.try_get("", column).map_err(db_error)
}

fn optional_instant(row: &QueryResult, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    get::<Option<i64>>(row, column)?.map(instant).transpose()
}

/// The columns [`run_record`] reads, in a form to put after `SELECT` or `RETURNING`.
pub(crate) const RUN_COLUMNS: &str = "id, job_id, tenant, status, trigger, priority, \
    scheduled_for_ms, parent_id, created_ms, started_ms, finished_ms, lease_owner, lease_expires_ms, \
    cancel_requested, group_key";

pub(crate) fn run_record(row: &QueryResult) -> Result<RunRecord, StoreError> {
    let lease = match (
        get::<Option<String>>(row, "lease_owner")?,
        get::<Option<i64>>(row, "lease_expires_ms")?,
    ) {
        (Some(owner), Some(expires)) => Some(Lease {
            owner,
            expires_at: instant(expires)?,
        }),
        _ => None,
    };
    Ok(RunRecord {
        id: RunId::parse(get::<String>(row, "id")?).map_err(|e| corrupt("run id", e))?,
        job: JobId::parse(get::<String>(row, "job_id")?).map_err(|e| corrupt("job id", e))?,
        tenant: TenantId::parse(get::<String>(row, "tenant")?).map_err(|e| corrupt("tenant", e))?,
        status: get::<String>(row, "status")?
            .parse()
            .map_err(|e| corrupt("run status", e))?,
        trigger: get::<String>(row, "trigger")?
            .parse()
            .map_err(|e| corrupt("trigger", e))?,
        priority: Priority::new(u64::try_from(get::<i16>(row, "priority")?).unwrap_or(0))
            .map_err(|e| corrupt("priority", e))?,
        scheduled_for: optional_instant(row, "scheduled_for_ms")?,
        parent: get::<Option<String>>(row, "parent_id")?
            .map(RunId::parse)
            .transpose()
            .map_err(|e| corrupt("parent id", e))?,
        group: get(row, "group_key")?,
        created_at: instant(get(row, "created_ms")?)?,
        started_at: optional_instant(row, "started_ms")?,
        finished_at: optional_instant(row, "finished_ms")?,
        lease,
        cancel_requested: get(row, "cancel_requested")?,
    })
}

/// The columns [`item_record`] reads.
pub(crate) const ITEM_COLUMNS: &str = "seq, item_key, user_id, status, attempts, next_attempt_ms, last_error, result, payload, \
     request_context";

pub(crate) fn item_record(row: &QueryResult) -> Result<ItemRecord, StoreError> {
    Ok(ItemRecord {
        seq: get(row, "seq")?,
        key: get(row, "item_key")?,
        user: get::<Option<String>>(row, "user_id")?
            .map(UserId::parse)
            .transpose()
            .map_err(|e| corrupt("user id", e))?,
        status: get::<String>(row, "status")?
            .parse()
            .map_err(|e| corrupt("item status", e))?,
        attempts: u32::try_from(get::<i32>(row, "attempts")?).unwrap_or(0),
        next_attempt_at: optional_instant(row, "next_attempt_ms")?,
        last_error: get(row, "last_error")?,
        result: get(row, "result")?,
        payload: get(row, "payload")?,
        request_context: get(row, "request_context")?,
    })
}

/// A text parameter.
pub(crate) fn text(s: impl Into<String>) -> Value {
    Value::String(Some(s.into()))
}

/// A nullable text parameter.
pub(crate) fn optional_text(s: Option<impl Into<String>>) -> Value {
    Value::String(s.map(Into::into))
}

/// A BIGINT parameter.
pub(crate) fn big(n: i64) -> Value {
    Value::BigInt(Some(n))
}

/// A nullable BIGINT parameter.
pub(crate) fn optional_big(n: Option<i64>) -> Value {
    Value::BigInt(n)
}

/// A nullable JSON parameter.
pub(crate) fn json(v: Option<serde_json::Value>) -> Value {
    Value::Json(v.map(Box::new))
}
