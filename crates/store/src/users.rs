//! [`UserRepository`] over the `system_users` table.

use std::collections::HashSet;

use async_trait::async_trait;
use batch_domain::config::Filter;
use batch_domain::{TenantId, UserId};
use batch_ports::{SourceError, UserRepository, UserValidation};
use sea_orm::{ConnectionTrait, Value};

use crate::Store;
use crate::categories::Sql;
use crate::convert::source_error;

/// Ids per `IN (…)` query.
const VALIDATE_CHUNK: usize = 1_000;

#[async_trait]
impl UserRepository for Store {
    async fn validate_users(
        &self,
        tenant: &TenantId,
        ids: &[UserId],
    ) -> Result<UserValidation, SourceError> {
        let mut found: HashSet<String> = HashSet::with_capacity(ids.len());
        for chunk in ids.chunks(VALIDATE_CHUNK) {
            let list = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT user_id FROM system_users \
                 WHERE tenant = $1 AND active = TRUE AND user_id IN ({list})"
            );
            let mut values = vec![Value::String(Some(tenant.as_str().to_owned()))];
            values.extend(
                chunk
                    .iter()
                    .map(|id| Value::String(Some(id.as_str().to_owned()))),
            );
            let rows = self
                .db
                .query_all_raw(self.statement(&sql, values))
                .await
                .map_err(source_error)?;
            for row in rows {
                let id: String = row.try_get("", "user_id").map_err(source_error)?;
                found.insert(id);
            }
        }
        let (valid, invalid) = ids
            .iter()
            .cloned()
            .partition(|id| found.contains(id.as_str()));
        Ok(UserValidation { valid, invalid })
    }

    async fn find_users(
        &self,
        tenant: &TenantId,
        filters: &[Filter],
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<UserId>, SourceError> {
        let mut sql = Sql {
            backend: self.backend(),
            values: vec![Value::String(Some(tenant.as_str().to_owned()))],
            key_column: "user_id",
        };
        let mut clause = String::from("tenant = $1 AND active = TRUE");
        for filter in filters {
            clause.push_str(" AND ");
            clause.push_str(&sql.condition(filter));
        }
        if let Some(after) = after {
            let p = sql.bind(Value::String(Some(after.as_str().to_owned())));
            clause.push_str(&format!(" AND user_id > {p}"));
        }
        let limit = sql.bind(Value::BigInt(Some(
            i64::try_from(limit).unwrap_or(i64::MAX),
        )));
        let query = format!(
            "SELECT user_id FROM system_users WHERE {clause} ORDER BY user_id LIMIT {limit}"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(&query, sql.values))
            .await
            .map_err(source_error)?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("", "user_id").map_err(source_error)?;
                UserId::parse(id)
                    .map_err(|e| SourceError::Unexpected(format!("stored user id: {e}")))
            })
            .collect()
    }
}
