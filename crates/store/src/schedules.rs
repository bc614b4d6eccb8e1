//! [`ScheduleStore`] over the `schedule_states` table.

use async_trait::async_trait;
use batch_domain::{JobId, TenantId};
use batch_ports::runs::StoreError;
use batch_ports::schedules::{Pause, ScheduleState, ScheduleStore};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, Value};

use crate::Store;
use crate::convert::{db_error, instant, millis, text};

fn optional_millis(t: Option<DateTime<Utc>>) -> Value {
    Value::BigInt(t.map(millis))
}

fn schedule_state(row: &sea_orm::QueryResult) -> Result<ScheduleState, StoreError> {
    let corrupt =
        |e: batch_domain::ids::Error| StoreError::Unexpected(format!("stored schedule state: {e}"));
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
        rows.iter().map(schedule_state).collect()
    }

    async fn schedule_state(
        &self,
        job: &JobId,
        group: &str,
    ) -> Result<Option<ScheduleState>, StoreError> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT job_id, group_key, tenant, next_nominal_ms, last_fired_ms \
                 FROM schedule_states WHERE job_id = $1 AND group_key = $2",
                vec![text(job.as_str()), text(group)],
            ))
            .await
            .map_err(db_error)?;
        row.as_ref().map(schedule_state).transpose()
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

    async fn pause_job(&self, pause: &Pause) -> Result<(), StoreError> {
        self.db
            .execute_raw(self.statement(
                "INSERT INTO job_pauses (job_id, tenant, note, paused_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (job_id) DO UPDATE SET note = excluded.note, tenant = excluded.tenant",
                vec![
                    text(pause.job.as_str()),
                    text(pause.tenant.as_str()),
                    text(&pause.note),
                    Value::BigInt(Some(millis(pause.since))),
                ],
            ))
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn resume_job(&self, job: &JobId) -> Result<bool, StoreError> {
        let removed = self
            .db
            .execute_raw(self.statement(
                "DELETE FROM job_pauses WHERE job_id = $1",
                vec![text(job.as_str())],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        Ok(removed > 0)
    }

    async fn paused_jobs(&self) -> Result<Vec<Pause>, StoreError> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT job_id, tenant, note, paused_ms FROM job_pauses ORDER BY job_id",
                vec![],
            ))
            .await
            .map_err(db_error)?;
        let corrupt =
            |e: batch_domain::ids::Error| StoreError::Unexpected(format!("stored pause: {e}"));
        rows.iter()
            .map(|row| {
                Ok(Pause {
                    job: JobId::parse(row.try_get::<String>("", "job_id").map_err(db_error)?)
                        .map_err(corrupt)?,
                    tenant: TenantId::parse(row.try_get::<String>("", "tenant").map_err(db_error)?)
                        .map_err(corrupt)?,
                    note: row.try_get("", "note").map_err(db_error)?,
                    since: instant(row.try_get("", "paused_ms").map_err(db_error)?)?,
                })
            })
            .collect()
    }
}
