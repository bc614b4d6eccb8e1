//! [`JobStore`] over the `jobs` and `job_catalog` tables.

use async_trait::async_trait;
use batch_domain::{JobId, TenantId};
use batch_ports::jobs::{JobDefinition, JobOrigin, JobStore};
use batch_ports::runs::StoreError;
use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseTransaction, TransactionTrait};

use crate::Store;
use crate::convert::{big, db_error, millis, text};

const BUMP: &str = "UPDATE job_catalog SET version = version + 1 WHERE id = 1";

impl Store {
    async fn bump(&self, txn: &DatabaseTransaction) -> Result<(), StoreError> {
        txn.execute_raw(self.statement(BUMP, vec![]))
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn upsert_job(
        &self,
        txn: &DatabaseTransaction,
        definition: &JobDefinition,
    ) -> Result<(), StoreError> {
        txn.execute_raw(self.statement(
            "INSERT INTO jobs (job_id, tenant, definition, origin, updated_ms) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (job_id) DO UPDATE SET tenant = excluded.tenant, \
                 definition = excluded.definition, origin = excluded.origin, \
                 updated_ms = excluded.updated_ms",
            vec![
                text(definition.id.as_str()),
                text(definition.tenant.as_str()),
                text(definition.definition.to_string()),
                text(definition.origin.as_str()),
                big(millis(Utc::now())),
            ],
        ))
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unexpected(format!("stored job {what}: {e}"))
}

#[async_trait]
impl JobStore for Store {
    async fn catalog_version(&self) -> Result<u64, StoreError> {
        let row = self
            .db
            .query_one_raw(self.statement("SELECT version FROM job_catalog WHERE id = 1", vec![]))
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::Unexpected("the job catalog row is missing".to_owned()))?;
        let version: i64 = row.try_get("", "version").map_err(db_error)?;
        Ok(u64::try_from(version).unwrap_or(0))
    }

    async fn job_definitions(&self) -> Result<(Vec<JobDefinition>, u64), StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let version = txn
            .query_one_raw(self.statement("SELECT version FROM job_catalog WHERE id = 1", vec![]))
            .await
            .map_err(db_error)?
            .map(|row| row.try_get::<i64>("", "version"))
            .transpose()
            .map_err(db_error)?
            .unwrap_or(0);
        let rows = txn
            .query_all_raw(self.statement(
                "SELECT job_id, tenant, definition, origin FROM jobs ORDER BY job_id",
                vec![],
            ))
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        let definitions = rows
            .iter()
            .map(|row| {
                let definition: String = row.try_get("", "definition").map_err(db_error)?;
                let origin: String = row.try_get("", "origin").map_err(db_error)?;
                Ok(JobDefinition {
                    id: JobId::parse(row.try_get::<String>("", "job_id").map_err(db_error)?)
                        .map_err(|e| corrupt("id", e))?,
                    tenant: TenantId::parse(row.try_get::<String>("", "tenant").map_err(db_error)?)
                        .map_err(|e| corrupt("tenant", e))?,
                    definition: serde_json::from_str(&definition)
                        .map_err(|e| corrupt("definition", e))?,
                    origin: match origin.as_str() {
                        "file" => JobOrigin::File,
                        "api" => JobOrigin::Api,
                        other => return Err(corrupt("origin", other)),
                    },
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((definitions, u64::try_from(version).unwrap_or(0)))
    }

    async fn sync_file_jobs(&self, definitions: &[JobDefinition]) -> Result<(), StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let ids: Vec<String> = definitions.iter().map(|d| d.id.to_string()).collect();
        let placeholders: Vec<String> = (1..=ids.len()).map(|n| format!("${n}")).collect();
        let sql = if ids.is_empty() {
            "DELETE FROM jobs WHERE origin = 'file'".to_owned()
        } else {
            format!(
                "DELETE FROM jobs WHERE origin = 'file' AND job_id NOT IN ({})",
                placeholders.join(", ")
            )
        };
        txn.execute_raw(self.statement(&sql, ids.into_iter().map(text).collect()))
            .await
            .map_err(db_error)?;
        for definition in definitions {
            let file = JobDefinition {
                origin: JobOrigin::File,
                ..definition.clone()
            };
            self.upsert_job(&txn, &file).await?;
        }
        self.bump(&txn).await?;
        txn.commit().await.map_err(db_error)
    }

    async fn create_job(&self, definition: &JobDefinition) -> Result<(), StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        txn.execute_raw(self.statement(
            "INSERT INTO jobs (job_id, tenant, definition, origin, updated_ms) \
             VALUES ($1, $2, $3, 'api', $4)",
            vec![
                text(definition.id.as_str()),
                text(definition.tenant.as_str()),
                text(definition.definition.to_string()),
                big(millis(Utc::now())),
            ],
        ))
        .await
        .map_err(|e| match db_error(e) {
            StoreError::AlreadyExists(_) => {
                StoreError::AlreadyExists(format!("a job {} exists already", definition.id))
            }
            other => other,
        })?;
        self.bump(&txn).await?;
        txn.commit().await.map_err(db_error)
    }

    async fn update_job(&self, definition: &JobDefinition) -> Result<(), StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let updated = txn
            .execute_raw(self.statement(
                "UPDATE jobs SET definition = $3, updated_ms = $4 \
                 WHERE job_id = $1 AND tenant = $2 AND origin = 'api'",
                vec![
                    text(definition.id.as_str()),
                    text(definition.tenant.as_str()),
                    text(definition.definition.to_string()),
                    big(millis(Utc::now())),
                ],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        if updated == 0 {
            return Err(StoreError::NotFound(format!(
                "no job {} created through the API",
                definition.id
            )));
        }
        self.bump(&txn).await?;
        txn.commit().await.map_err(db_error)
    }

    async fn delete_job(&self, tenant: &TenantId, id: &JobId) -> Result<bool, StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let deleted = txn
            .execute_raw(self.statement(
                "DELETE FROM jobs WHERE job_id = $1 AND tenant = $2 AND origin = 'api'",
                vec![text(id.as_str()), text(tenant.as_str())],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        if deleted > 0 {
            self.bump(&txn).await?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(deleted > 0)
    }
}
