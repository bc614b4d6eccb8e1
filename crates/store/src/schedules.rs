//! [`ScheduleStore`] over the `schedule_states` table.

use async_trait::async_trait;
use batch_domain::{JobId, TenantId};
use batch_ports::runs::StoreError;
use batch_ports::schedules::{ScheduleState, ScheduleStore};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, Value};

use crate::Store;
use crate::convert::{db_error, instant, millis, text};

fn optional_millis(t: Option<DateTime<Utc>>) -> Value {
    Value::BigInt(t.map(millis))
}

#[async_trait]
impl ScheduleStore for Store {
    async fn schedule_states(&self) -> Result<Vec<ScheduleState>, StoreError> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT job_id, group_key, tenant, next_nominal_ms, last_fired_ms \
                 FROM schedule_states ORDER BY next_nominal_ms, job_id, group_key",
                vec![],
            ))
            .await
            .map_err(db_error)?;
        let corrupt = |e: batch_domain::ids::Error| {
            StoreError::Unexpected(format!("stored schedule state: {e}"))
        };
        rows.iter()
            .map(|row| {
                let get_instant = |column: &str| -> Result<Option<DateTime<Utc>>, StoreError> {
                    row.try_get::<Option<i64>>("", column)
                        .map_err(db_error)?
                        .map(instant)
                        .transpose()
                };
                Ok(ScheduleState {
                    job: JobId::parse(row.try_get::<String>("", "job_id").map_err(db_error)?)
                        .map_err(corrupt)?,
                    group: row.try_get("", "group_key").map_err(db_error)?,
                    tenant: TenantId::parse(row.try_get::<String>("", "tenant").map_err(db_error)?)
                        .map_err(corrupt)?,
                    next_nominal: get_instant("next_nominal_ms")?,
                    last_fired: get_instant("last_fired_ms")?,
                })
            })
            .collect()
    }

    async fn advance_schedule(
        &self,
        expected: Option<Option<DateTime<Utc>>>,
        state: &ScheduleState,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let values = vec![
            text(state.job.as_str()),
            text(&state.group),
            text(state.tenant.as_str()),
            optional_millis(state.next_nominal),
            optional_millis(state.last_fired),
            Value::BigInt(Some(millis(now))),
        ];
        let statement = match expected {
            None => self.statement(
                "INSERT INTO schedule_states \
                     (job_id, group_key, tenant, next_nominal_ms, last_fired_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, group_key) DO NOTHING",
                values,
            ),
            Some(seen) => {
                let mut values = values;
                values.push(optional_millis(seen));
                // `IS NOT DISTINCT FROM` in PostgreSQL, `IS` in SQLite: NULL equals NULL.
                let same = match self.backend() {
                    sea_orm::DbBackend::Postgres => "IS NOT DISTINCT FROM",
                    _ => "IS",
                };
                self.statement(
                    &format!(
                        "UPDATE schedule_states SET tenant = $3, next_nominal_ms = $4, \
                             last_fired_ms = $5, updated_ms = $6 \
                         WHERE job_id = $1 AND group_key = $2 AND next_nominal_ms {same} $7"
                    ),
                    values,
                )
            }
        };
        let changed = self
            .db
            .execute_raw(statement)
            .await
            .map_err(db_error)?
            .rows_affected();
        Ok(changed == 1)
    }
}
