//! [`ContextStore`] over the `batch_contexts` and `batch_references` tables.

use async_trait::async_trait;
use batch_domain::context::{BatchContext, Progress};
use batch_domain::run::RunId;
use batch_domain::{JobId, TenantId, UserId};
use batch_ports::contexts::{BatchReference, ContextStore, ReferenceCursor};
use batch_ports::runs::StoreError;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, TransactionTrait, Value};

use crate::Store;
use crate::convert::{db_error, instant, millis, text};

/// References per multi-row `INSERT` (5 parameters each).
const REFERENCE_ROWS: usize = 1_000;

fn encode(context: &BatchContext) -> Result<Value, StoreError> {
    serde_json::to_value(context)
        .map(|v| Value::Json(Some(Box::new(v))))
        .map_err(|e| StoreError::Unexpected(format!("encoding a batch context: {e}")))
}

impl Store {
    async fn load_context<C: ConnectionTrait>(
        &self,
        conn: &C,
        tenant: &TenantId,
        run: &RunId,
        lock: bool,
    ) -> Result<BatchContext, StoreError> {
        let lock = if lock && self.backend() == sea_orm::DbBackend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let sql = format!(
            "SELECT context, progress FROM batch_contexts WHERE run_id = $1 AND tenant = $2{lock}"
        );
        let row = conn
            .query_one_raw(self.statement(&sql, vec![text(run.as_str()), text(tenant.as_str())]))
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::NotFound(format!("context of run {run}")))?;
        let value: serde_json::Value = row.try_get("", "context").map_err(db_error)?;
        let mut context: BatchContext = serde_json::from_value(value).map_err(|e| {
            StoreError::Unexpected(format!("stored context of run {run} is invalid: {e}"))
        })?;
        // Progress saved since the context was last written wins over the context's own.
        let progress: Option<serde_json::Value> = row.try_get("", "progress").map_err(db_error)?;
        if let Some(progress) = progress {
            context.progress = serde_json::from_value(progress).map_err(|e| {
                StoreError::Unexpected(format!("stored progress of run {run} is invalid: {e}"))
            })?;
        }
        Ok(context)
    }

    async fn write_context<C: ConnectionTrait>(
        &self,
        conn: &C,
        tenant: &TenantId,
        run: &RunId,
        context: &BatchContext,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        conn.execute_raw(self.statement(
            "INSERT INTO batch_contexts (run_id, tenant, context, progress, updated_ms) \
             VALUES ($1, $2, $3, NULL, $4) \
             ON CONFLICT (run_id) DO UPDATE SET context = excluded.context, progress = NULL, \
                 updated_ms = excluded.updated_ms \
             WHERE batch_contexts.tenant = excluded.tenant",
            vec![
                text(run.as_str()),
                text(tenant.as_str()),
                encode(context)?,
                Value::BigInt(Some(millis(now))),
            ],
        ))
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

#[async_trait]
impl ContextStore for Store {
    async fn save_context(
        &self,
        tenant: &TenantId,
        run: &RunId,
        context: &BatchContext,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.write_context(&self.db, tenant, run, context, now)
            .await
    }

    async fn context(&self, tenant: &TenantId, run: &RunId) -> Result<BatchContext, StoreError> {
        self.load_context(&self.db, tenant, run, false).await
    }

    async fn save_progress(
        &self,
        tenant: &TenantId,
        run: &RunId,
        progress: &Progress,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let progress = serde_json::to_value(progress)
            .map_err(|e| StoreError::Unexpected(format!("encoding progress: {e}")))?;
        let written = self
            .db
            .execute_raw(self.statement(
                "UPDATE batch_contexts SET progress = $3, updated_ms = $4 \
                 WHERE run_id = $1 AND tenant = $2",
                vec![
                    text(run.as_str()),
                    text(tenant.as_str()),
                    Value::Json(Some(Box::new(progress))),
                    Value::BigInt(Some(millis(now))),
                ],
            ))
            .await
            .map_err(db_error)?;
        if written.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("context of run {run}")));
        }
        Ok(())
    }

    async fn merge_into_parent(
        &self,
        tenant: &TenantId,
        parent: &RunId,
        child: &RunId,
        now: DateTime<Utc>,
    ) -> Result<BatchContext, StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let mut merged = self.load_context(&txn, tenant, parent, true).await?;
        let child_context = self.load_context(&txn, tenant, child, false).await?;
        merged.merge_child(&child_context);
        self.write_context(&txn, tenant, parent, &merged, now)
            .await?;
        txn.commit().await.map_err(db_error)?;
        Ok(merged)
    }

    async fn add_references(
        &self,
        tenant: &TenantId,
        job: &JobId,
        run: &RunId,
        users: &[UserId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let mut added = 0;
        for chunk in users.chunks(REFERENCE_ROWS) {
            let rows = (0..chunk.len())
                .map(|i| format!("($1, ${}, $2, $3, $4)", i + 5))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO batch_references (run_id, user_id, tenant, job_id, created_ms) VALUES {rows} \
                 ON CONFLICT (run_id, user_id) DO NOTHING"
            );
            let mut values = vec![
                text(run.as_str()),
                text(tenant.as_str()),
                text(job.as_str()),
                Value::BigInt(Some(millis(now))),
            ];
            values.extend(chunk.iter().map(|u| text(u.as_str())));
            added += txn
                .execute_raw(self.statement(&sql, values))
                .await
                .map_err(db_error)?
                .rows_affected();
        }
        txn.commit().await.map_err(db_error)?;
        Ok(added)
    }

    async fn references(
        &self,
        tenant: &TenantId,
        user: &UserId,
        cursor: Option<&ReferenceCursor>,
        limit: usize,
    ) -> Result<Vec<BatchReference>, StoreError> {
        let mut values = vec![
            text(tenant.as_str()),
            text(user.as_str()),
            Value::BigInt(Some(i64::try_from(limit).unwrap_or(i64::MAX))),
        ];
        let after = match cursor {
            Some(cursor) => {
                values.push(Value::BigInt(Some(millis(cursor.created_at))));
                values.push(text(cursor.run.as_str()));
                " AND (created_ms < $4 OR (created_ms = $4 AND run_id < $5))"
            }
            None => "",
        };
        let sql = format!(
            "SELECT run_id, job_id, user_id, created_ms FROM batch_references \
             WHERE tenant = $1 AND user_id = $2{after} \
             ORDER BY created_ms DESC, run_id DESC LIMIT $3"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(&sql, values))
            .await
            .map_err(db_error)?;
        let corrupt =
            |e: batch_domain::ids::Error| StoreError::Unexpected(format!("stored reference: {e}"));
        rows.iter()
            .map(|row| {
                Ok(BatchReference {
                    run: RunId::parse(row.try_get::<String>("", "run_id").map_err(db_error)?)
                        .map_err(corrupt)?,
                    job: JobId::parse(row.try_get::<String>("", "job_id").map_err(db_error)?)
                        .map_err(corrupt)?,
                    user: UserId::parse(row.try_get::<String>("", "user_id").map_err(db_error)?)
                        .map_err(corrupt)?,
                    created_at: instant(row.try_get("", "created_ms").map_err(db_error)?)?,
                })
            })
            .collect()
    }
}
