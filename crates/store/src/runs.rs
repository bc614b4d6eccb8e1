//! [`RunStore`] over SQLite and PostgreSQL.

use async_trait::async_trait;
use batch_domain::priority::Aging;
use batch_domain::run::{ItemCounts, ItemStatus, RunId, RunStatus};
use batch_domain::{JobId, TenantId};
use batch_ports::runs::{
    ItemOutcome, ItemRecord, NewItem, NewRun, Occurrence, RunCursor, RunDraft, RunFilter,
    RunRecord, RunStore, StoreError, TenantLoad,
};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, TransactionTrait, Value};

use crate::Store;
use crate::convert::{
    ITEM_COLUMNS, RUN_COLUMNS, big, db_error, instant, item_record, json, millis, optional_big,
    optional_text, run_record, text,
};

/// The PostgreSQL channel on which the store announces a run that was queued (created, or
/// released by a stopping process): `Store::listen_for_queued_runs` listens on it.
pub(crate) const QUEUED_CHANNEL: &str = "batch_runs_queued";

/// Rows per multi-row `INSERT` on PostgreSQL: 8 parameters each stays far below its 65 535
/// parameters per statement, and one statement per thousand items keeps round trips rare.
const INSERT_ROWS: usize = 1_000;

/// Outcomes per `UPDATE … FROM (VALUES …)` on PostgreSQL: 7 parameters each.
const OUTCOME_ROWS: usize = 1_000;

/// Parameters per statement on SQLite, well below its limit of 32 766. Numbered parameters
/// made binding cost the square of a statement's parameters (sqlx asks SQLite for each one's
/// name, found by a linear scan): 8 000 of them spent a third of a P1 run binding, and even
/// at 512 they took 7 % of its samples. SQLite statements are now sent with anonymous
/// parameters ([`crate::statement`]), which bind in constant time, so a chunk's outcomes
/// (500 × 7) go in one statement again (BENCHMARKS.md, session 9, has the figures).
const SQLITE_PARAMETERS: usize = 4_096;

/// Rows of `width` parameters per multi-row statement on `backend`, at most `most`.
fn rows_per_statement(backend: DbBackend, width: usize, most: usize) -> usize {
    match backend {
        DbBackend::Sqlite => (SQLITE_PARAMETERS / width).clamp(1, most),
        _ => most,
    }
}

impl Store {
    /// Inserts the row of `run` (status `queued`) and links its occurrence.
    async fn insert_run(
        &self,
        conn: &impl ConnectionTrait,
        run: &NewRun,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO runs (id, job_id, tenant, status, trigger, priority, \
                scheduled_for_ms, parent_id, created_ms, serial, group_key) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
        conn.execute_raw(self.statement(
            sql,
            vec![
                text(run.id.as_str()),
                text(run.job.as_str()),
                text(run.tenant.as_str()),
                text(RunStatus::Queued.as_str()),
                text(run.trigger.as_str()),
                Value::SmallInt(Some(i16::from(run.priority.value()))),
                optional_big(run.scheduled_for.map(millis)),
                optional_text(run.parent.as_ref().map(RunId::as_str)),
                big(millis(run.created_at)),
                Value::Bool(Some(run.serial)),
                text(&run.group),
            ],
        ))
        .await
        .map_err(db_error)?;
        if let Some(occurrence) = run.occurrence {
            // The unique index makes a second run for one occurrence fail here.
            conn.execute_raw(self.statement(
                "UPDATE runs SET occurrence_id = $2 WHERE id = $1",
                vec![text(run.id.as_str()), big(occurrence)],
            ))
            .await
            .map_err(db_error)?;
        }
        Ok(())
    }
}

/// Inserts `items` of `run` at positions `after + 1`, `after + 2`, …, in multi-row
/// statements.
async fn insert_items(
    backend: DbBackend,
    conn: &impl ConnectionTrait,
    run: &NewRun,
    after: i64,
    items: &[NewItem],
) -> Result<(), StoreError> {
    let now = millis(run.created_at);
    let mut seq = after;
    for chunk in items.chunks(rows_per_statement(backend, 8, INSERT_ROWS)) {
        let sql = format!(
            "INSERT INTO run_items (run_id, seq, item_key, user_id, tenant, status, payload, updated_ms) VALUES {}",
            placeholders(chunk.len(), 8, 1)
        );
        let mut values = Vec::with_capacity(chunk.len() * 8);
        for item in chunk {
            seq += 1;
            values.extend([
                text(run.id.as_str()),
                big(seq),
                text(item.key.clone()),
                optional_text(item.user.as_ref().map(|u| u.as_str().to_owned())),
                text(run.tenant.as_str()),
                text(item.status.as_str()),
                json(Some(item.payload.clone())),
                big(now),
            ]);
        }
        conn.execute_raw(crate::statement(backend, &sql, values))
            .await
            .map_err(|e| match db_error(e) {
                // The only unique keys an item insert can break are the run's item keys (and
                // positions, which follow on): not "the run exists already", which callers take
                // for another replica having created it, so a run's duplicate key must not read as
                // that.
                StoreError::AlreadyExists(detail) => StoreError::Unexpected(format!(
                    "a key appears twice among the items of run {}: {detail}",
                    run.id
                )),
                other => other,
            })?;
    }
    Ok(())
}

/// A run drafted inside an open transaction (PostgreSQL): a writer task owns the transaction
/// and inserts each page while the strategy reads the next, so preparing takes about the
/// longer of reading and writing rather than both. At most one page waits for the writer, so
/// memory stays bounded by a few pages whatever the run's size.
struct StreamedDraft {
    /// Pages for the writer; `None` once it has stopped.
    pages: Option<tokio::sync::mpsc::Sender<Vec<NewItem>>>,
    /// The writer: it hands the transaction back once the pages end, or says why it stopped.
    writer: Option<tokio::task::JoinHandle<Result<DatabaseTransaction, StoreError>>>,
}

impl StreamedDraft {
    /// Starts the writer of `run`, whose row `txn` holds; `permit` is given back when the
    /// writer ends.
    fn start(
        backend: DbBackend,
        txn: DatabaseTransaction,
        run: NewRun,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> StreamedDraft {
        let (pages, mut next) = tokio::sync::mpsc::channel::<Vec<NewItem>>(1);
        let writer = tokio::spawn(async move {
            let _permit = permit;
            let mut written = 0i64;
            while let Some(items) = next.recv().await {
                insert_items(backend, &txn, &run, written, &items).await?;
                written += i64::try_from(items.len()).unwrap_or(i64::MAX);
            }
            Ok(txn)
        });
        StreamedDraft {
            pages: Some(pages),
            writer: Some(writer),
        }
    }

    /// Waits for the writer to end (its pages closed): the transaction, or why it stopped.
    async fn written(&mut self) -> Result<DatabaseTransaction, StoreError> {
        self.pages = None;
        let writer = self.writer.take().ok_or_else(|| {
            StoreError::Unexpected("the run's draft was already ended".to_owned())
        })?;
        writer
            .await
            .map_err(|e| StoreError::Unexpected(format!("the run's draft writer failed: {e}")))?
    }
}

impl Drop for StreamedDraft {
    /// A draft dropped before its commit stops its writer at once, so the transaction is rolled
    /// back and its connection and row locks let go without inserting the pages still queued.
    fn drop(&mut self) {
        if let Some(writer) = &self.writer {
            writer.abort();
        }
    }
}

#[async_trait]
impl RunDraft for StreamedDraft {
    async fn append(&mut self, items: Vec<NewItem>) -> Result<(), StoreError> {
        let Some(pages) = &self.pages else {
            return Err(StoreError::Unexpected(
                "the run's draft was already ended".to_owned(),
            ));
        };
        if pages.send(items).await.is_err() {
            // The writer stopped on an error: that error is the answer.
            return match self.written().await {
                Err(e) => Err(e),
                Ok(_) => Err(StoreError::Unexpected(
                    "the run's draft writer stopped early".to_owned(),
                )),
            };
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.written().await?.commit().await.map_err(db_error)
    }
}

/// A run drafted in memory and written in one transaction at commit: on SQLite, whose single
/// connection the strategy needs for reading its sources meanwhile, and on PostgreSQL while
/// `STREAMED_DRAFTS` others stream.
struct BufferedDraft<'s> {
    store: &'s Store,
    run: NewRun,
    items: Vec<NewItem>,
}

#[async_trait]
impl RunDraft for BufferedDraft<'_> {
    async fn append(&mut self, items: Vec<NewItem>) -> Result<(), StoreError> {
        self.items.extend(items);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let txn = self.store.db.begin().await.map_err(db_error)?;
        self.store.insert_run(&txn, &self.run).await?;
        insert_items(self.store.backend(), &txn, &self.run, 0, &self.items).await?;
        txn.commit().await.map_err(db_error)
    }
}

/// `($1, $2, …), ($n, …)` for `rows` rows of `width` parameters, numbered from `first`.
fn placeholders(rows: usize, width: usize, first: usize) -> String {
    let mut out = String::with_capacity(rows * width * 5);
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for column in 0..width {
            if column > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + row * width + column).to_string());
        }
        out.push(')');
    }
    out
}

/// A serial run may start only when no other run of its job and group is running and no older
/// queued serial run of its job and group waits (a running run itself passes: its lease may be
/// taken over).
const SERIAL_READY: &str = "(NOT serial OR status = 'running' OR (\
    NOT EXISTS (SELECT 1 FROM runs other WHERE other.job_id = runs.job_id \
        AND other.group_key = runs.group_key \
        AND other.id <> runs.id AND other.status = 'running') \
    AND NOT EXISTS (SELECT 1 FROM runs older WHERE older.job_id = runs.job_id \
        AND older.group_key = runs.group_key \
        AND older.serial AND older.status = 'queued' \
        AND (older.created_ms < runs.created_ms \
             OR (older.created_ms = runs.created_ms AND older.id < runs.id)))))";

/// The PostgreSQL advisory lock key under which claims bounded by the global limit take turns
/// ("batchrun" in ASCII).
const GLOBAL_LIMIT_LOCK: i64 = 0x6261_7463_6872_756e;

/// The lock clause that lets concurrent claimers pass each other on PostgreSQL. SQLite has a
/// single writer, and the claim is one statement.
fn skip_locked(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => " FOR UPDATE SKIP LOCKED",
        _ => "",
    }
}

#[async_trait]
impl RunStore for Store {
    async fn create_occurrence(
        &self,
        job: &JobId,
        tenant: &TenantId,
        nominal: DateTime<Utc>,
        group: &str,
    ) -> Result<Occurrence, StoreError> {
        let inserted = self
            .db
            .execute_raw(self.statement(
                "INSERT INTO occurrences (job_id, tenant, nominal_ms, group_key, created_ms) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (job_id, nominal_ms, group_key) DO NOTHING",
                vec![
                    text(job.as_str()),
                    text(tenant.as_str()),
                    big(millis(nominal)),
                    text(group),
                    big(millis(Utc::now())),
                ],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT id FROM occurrences WHERE job_id = $1 AND nominal_ms = $2 AND group_key = $3",
                vec![text(job.as_str()), big(millis(nominal)), text(group)],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::Unexpected("occurrence vanished after insert".to_owned()))?;
        let id: i64 = row.try_get("", "id").map_err(db_error)?;
        Ok(if inserted == 1 {
            Occurrence::Created(id)
        } else {
            Occurrence::Existed(id)
        })
    }

    async fn run_for_occurrence(&self, occurrence: i64) -> Result<Option<RunId>, StoreError> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT id FROM runs WHERE occurrence_id = $1",
                vec![big(occurrence)],
            ))
            .await
            .map_err(db_error)?;
        row.map(|row| {
            let id: String = row.try_get("", "id").map_err(db_error)?;
            RunId::parse(id).map_err(|e| StoreError::Unexpected(format!("stored run id: {e}")))
        })
        .transpose()
    }

    async fn occurrences_without_run(
        &self,
        job: &JobId,
        group: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>, StoreError> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT o.nominal_ms FROM occurrences o \
                 WHERE o.job_id = $1 AND o.group_key = $2 \
                 AND o.nominal_ms >= $3 AND o.nominal_ms <= $4 \
                 AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.occurrence_id = o.id) \
                 ORDER BY o.nominal_ms",
                vec![
                    text(job.as_str()),
                    text(group),
                    big(millis(from)),
                    big(millis(until)),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| instant(row.try_get("", "nominal_ms").map_err(db_error)?))
            .collect()
    }

    async fn begin_run(&self, run: NewRun) -> Result<Box<dyn RunDraft + '_>, StoreError> {
        // One connection serves the whole embedded store: a transaction held open while the
        // strategy reads its sources through that same store would wait for itself. On
        // PostgreSQL a few drafts at once stream (see `STREAMED_DRAFTS`).
        let permit = match self.backend() {
            DbBackend::Sqlite => None,
            _ => self.streamed_drafts.clone().try_acquire_owned().ok(),
        };
        let Some(permit) = permit else {
            return Ok(Box::new(BufferedDraft {
                store: self,
                run,
                items: Vec::new(),
            }));
        };
        let txn = self.db.begin().await.map_err(db_error)?;
        self.insert_run(&txn, &run).await?;
        Ok(Box::new(StreamedDraft::start(
            self.backend(),
            txn,
            run,
            permit,
        )))
    }

    async fn claim_runs(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        self.ensure_single_process()?;
        // A materialized CTE picks the rows once: PostgreSQL may evaluate an `IN (SELECT …
        // LIMIT … SKIP LOCKED)` subquery more than once and so lock more rows than the limit.
        let sql = format!(
            "WITH picked AS MATERIALIZED (SELECT id AS pick_id FROM runs \
                 WHERE status IN ('queued', 'running') \
                   AND (lease_expires_ms IS NULL OR lease_expires_ms <= $3) \
                   AND {SERIAL_READY} \
                 ORDER BY priority DESC, created_ms, id LIMIT $4{}) \
             UPDATE runs SET status = 'running', lease_owner = $1, lease_expires_ms = $2, \
                 started_ms = COALESCE(started_ms, $3) \
             FROM picked WHERE runs.id = picked.pick_id \
             RETURNING {RUN_COLUMNS}",
            skip_locked(self.backend())
        );
        let rows = self
            .db
            .query_all_raw(self.statement(
                &sql,
                vec![
                    text(owner),
                    big(millis(lease_until)),
                    big(millis(now)),
                    big(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            ))
            .await
            .map_err(db_error)?;
        let mut runs = rows.iter().map(run_record).collect::<Result<Vec<_>, _>>()?;
        runs.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.created_at.cmp(&b.created_at))
                .then(a.id.cmp(&b.id))
        });
        Ok(runs)
    }

    async fn claim_run(
        &self,
        run: &RunId,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        max_running: Option<usize>,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.ensure_single_process()?;
        let mut values = vec![
            text(run.as_str()),
            text(owner),
            big(millis(lease_until)),
            big(millis(now)),
        ];
        let limit = match max_running {
            Some(max) => {
                values.push(big(i64::try_from(max).unwrap_or(i64::MAX)));
                "AND (SELECT COUNT(*) FROM runs busy WHERE busy.status = 'running' \
                     AND busy.lease_expires_ms > $4 AND busy.id <> $1) < $5"
            }
            None => "",
        };
        let sql = format!(
            "UPDATE runs SET status = 'running', lease_owner = $2, lease_expires_ms = $3, \
                 started_ms = COALESCE(started_ms, $4) \
             WHERE id = $1 AND status IN ('queued', 'running') \
               AND (lease_expires_ms IS NULL OR lease_expires_ms <= $4) \
               AND {SERIAL_READY} {limit} \
             RETURNING {RUN_COLUMNS}"
        );
        let txn = self.db.begin().await.map_err(db_error)?;
        if max_running.is_some() && self.backend() == DbBackend::Postgres {
            // Claims under the global limit take turns, so two replicas never both see the
            // last free slot. SQLite has a single writer already.
            txn.execute_raw(self.statement(
                "SELECT pg_advisory_xact_lock($1)",
                vec![big(GLOBAL_LIMIT_LOCK)],
            ))
            .await
            .map_err(db_error)?;
        }
        let row = txn
            .query_one_raw(self.statement(&sql, values))
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        row.as_ref().map(run_record).transpose()
    }

    async fn claimable_runs(
        &self,
        now: DateTime<Utc>,
        aging: Aging,
        per_tenant: usize,
        jobs: &[JobId],
    ) -> Result<Vec<RunRecord>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let job_params: Vec<String> = (5..5 + jobs.len()).map(|n| format!("${n}")).collect();
        // Effective priority as `batch_domain::priority::effective_priority` computes it, in
        // integer arithmetic both backends share.
        let effective = "priority + CASE WHEN created_ms >= $1 THEN 0 \
             WHEN ($1 - created_ms) / $2 > $3 THEN $3 \
             ELSE ($1 - created_ms) / $2 END";
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM (SELECT {RUN_COLUMNS}, ROW_NUMBER() OVER ( \
                 PARTITION BY tenant ORDER BY {effective} DESC, created_ms, id) AS tenant_rank \
               FROM runs WHERE status IN ('queued', 'running') \
                 AND (lease_expires_ms IS NULL OR lease_expires_ms <= $1) \
                 AND job_id IN ({}) \
                 AND {SERIAL_READY}) ranked \
             WHERE tenant_rank <= $4 ORDER BY tenant, tenant_rank",
            job_params.join(", ")
        );
        let interval = aging.interval.num_milliseconds().max(1_000);
        let rows = self
            .db
            .query_all_raw(
                self.statement(
                    &sql,
                    [
                        big(millis(now)),
                        big(interval),
                        big(i64::from(aging.cap)),
                        big(i64::try_from(per_tenant).unwrap_or(i64::MAX)),
                    ]
                    .into_iter()
                    .chain(jobs.iter().map(|j| text(j.as_str())))
                    .collect(),
                ),
            )
            .await
            .map_err(db_error)?;
        rows.iter().map(run_record).collect()
    }

    async fn tenant_loads(
        &self,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> Result<Vec<TenantLoad>, StoreError> {
        let live = "(status = 'running' AND lease_expires_ms > $1)";
        let sql = format!(
            "SELECT tenant, SUM(CASE WHEN {live} THEN 1 ELSE 0 END) AS running, COUNT(*) AS load \
             FROM runs WHERE {live} OR started_ms >= $2 GROUP BY tenant ORDER BY tenant"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(&sql, vec![big(millis(now)), big(millis(since))]))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let tenant: String = row.try_get("", "tenant").map_err(db_error)?;
                let running: i64 = row.try_get("", "running").map_err(db_error)?;
                let load: i64 = row.try_get("", "load").map_err(db_error)?;
                Ok(TenantLoad {
                    tenant: TenantId::parse(tenant)
                        .map_err(|e| StoreError::Unexpected(format!("stored tenant: {e}")))?,
                    running: usize::try_from(running).unwrap_or(0),
                    load: usize::try_from(load).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn renew_lease(
        &self,
        run: &RunId,
        owner: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "UPDATE runs SET lease_expires_ms = $3 \
                 WHERE id = $1 AND lease_owner = $2 AND status IN ('queued', 'running') \
                 RETURNING cancel_requested",
                vec![text(run.as_str()), text(owner), big(millis(until))],
            ))
            .await
            .map_err(db_error)?;
        match row {
            Some(row) => row.try_get("", "cancel_requested").map_err(db_error),
            None => Err(StoreError::LeaseLost(format!(
                "{owner} does not hold the lease on run {run}"
            ))),
        }
    }

    async fn request_cancel(&self, run: &RunId) -> Result<(), StoreError> {
        self.db
            .execute_raw(self.statement(
                "UPDATE runs SET cancel_requested = TRUE \
                 WHERE id = $1 AND status IN ('queued', 'running')",
                vec![text(run.as_str())],
            ))
            .await
            .map_err(db_error)?;
        Ok(())
    }
    async fn active_runs(&self, job: &JobId) -> Result<Vec<RunRecord>, StoreError> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs \
             WHERE job_id = $1 AND status IN ('queued', 'running') ORDER BY created_ms, id"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(&sql, vec![text(job.as_str())]))
            .await
            .map_err(db_error)?;
        rows.iter().map(run_record).collect()
    }

    async fn announce_queued(&self, run: &RunId) -> Result<(), StoreError> {
        // On PostgreSQL every process listening (`Store::listen_for_queued_runs`) hears it.
        if self.backend() == DbBackend::Postgres {
            self.db
                .execute_raw(self.statement(
                    "SELECT pg_notify($1, $2)",
                    vec![text(QUEUED_CHANNEL), text(run.as_str())],
                ))
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    async fn release_lease(&self, run: &RunId, owner: &str) -> Result<(), StoreError> {
        let release = "UPDATE runs SET lease_owner = NULL, lease_expires_ms = NULL \
                 WHERE id = $1 AND lease_owner = $2";
        // A released run is queued again: on PostgreSQL the listening processes hear of it.
        let announced;
        let sql = if self.backend() == DbBackend::Postgres {
            announced = format!(
                "WITH released AS ({release} RETURNING id) \
                 SELECT pg_notify('{QUEUED_CHANNEL}', id) FROM released"
            );
            announced.as_str()
        } else {
            release
        };
        self.db
            .execute_raw(self.statement(sql, vec![text(run.as_str()), text(owner)]))
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn due_items(
        &self,
        run: &RunId,
        now: DateTime<Utc>,
        after_seq: i64,
        skip: &[i64],
        limit: usize,
    ) -> Result<Vec<ItemRecord>, StoreError> {
        // A read, not an update: the run's lease keeps everyone else off its items, and
        // writing a lease on each item row was the largest cost of a chunk in PostgreSQL
        // (18.6 ms of about 50 per chunk of 500 in the P1 benchmark). The positions to skip
        // go in as one JSON array, which both backends turn into a hashed set.
        let skipped = match (skip.is_empty(), self.backend()) {
            (true, _) => "",
            (false, DbBackend::Postgres) => {
                " AND seq NOT IN (SELECT value::bigint FROM jsonb_array_elements_text($5))"
            }
            (false, _) => " AND seq NOT IN (SELECT value FROM json_each($5))",
        };
        let sql = format!(
            "SELECT {ITEM_COLUMNS} FROM run_items \
             WHERE run_id = $1 AND status = 'pending' AND seq > $3 \
               AND (next_attempt_ms IS NULL OR next_attempt_ms <= $2){skipped} \
             ORDER BY seq LIMIT $4"
        );
        let mut values = vec![
            text(run.as_str()),
            big(millis(now)),
            big(after_seq),
            big(i64::try_from(limit).unwrap_or(i64::MAX)),
        ];
        if !skip.is_empty() {
            values.push(json(Some(serde_json::Value::from(skip.to_vec()))));
        }
        let rows = self
            .db
            .query_all_raw(self.statement(&sql, values))
            .await
            .map_err(db_error)?;
        rows.iter().map(item_record).collect()
    }

    async fn record_outcomes(
        &self,
        run: &RunId,
        owner: &str,
        outcomes: &[ItemOutcome],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let postgres = self.backend() == DbBackend::Postgres;
        for chunk in outcomes.chunks(rows_per_statement(self.backend(), 7, OUTCOME_ROWS)) {
            // VALUES columns are named column1, column2, … on both backends. The run's lease
            // fences the write off from a processor whose run was taken over: without it the
            // statement updates nothing. On PostgreSQL the run's row stays locked for share
            // until commit, so a takeover (an update of that row) waits for this write instead
            // of slipping in before its commit; SQLite's one writer serialises them anyway.
            // The test rides in the statement itself: a statement of its own per chunk took
            // P3 over its goal (0.0203 statements per item).
            let sql = if postgres {
                // Each outcome finds its row through the (run, key) index in a `LATERAL`
                // probe, and the update fetches those rows through the primary key
                // (`seq = ANY(ARRAY(…))`). Joined by key or position alone, PostgreSQL hashed
                // every item of the run for each chunk whenever it thought a sequential scan
                // cheaper than 500 index lookups (auto_explain in the P2 benchmark). The
                // probe's `LIMIT 1` keeps the planner from flattening it into such a join:
                // without it a chunk's record took 45 ms instead of about 10 (P1 benchmark).
                format!(
                    "WITH held AS MATERIALIZED (SELECT id FROM runs \
                         WHERE id = $1 AND lease_owner = $3 FOR SHARE), \
                     v AS (VALUES {}), \
                     mine AS MATERIALIZED (SELECT i.seq, v.* FROM held CROSS JOIN v CROSS JOIN LATERAL \
                         (SELECT seq FROM run_items WHERE run_id = $1 \
                            AND item_key = v.column1 LIMIT 1) AS i) \
                     UPDATE run_items SET status = mine.column2, attempts = mine.column3, \
                         next_attempt_ms = mine.column4, last_error = mine.column5, \
                         result = mine.column6, \
                         request_context = COALESCE(mine.column7, run_items.request_context), \
                         updated_ms = $2 \
                     FROM mine WHERE run_items.run_id = $1 \
                       AND run_items.seq = ANY(ARRAY(SELECT seq FROM mine)) \
                       AND run_items.seq = mine.seq",
                    placeholders(chunk.len(), 7, 4)
                )
            } else {
                format!(
                    "UPDATE run_items SET status = v.column2, attempts = v.column3, \
                         next_attempt_ms = v.column4, last_error = v.column5, result = v.column6, \
                         request_context = COALESCE(v.column7, run_items.request_context), \
                         updated_ms = $2 \
                     FROM (VALUES {}) AS v \
                     WHERE run_items.run_id = $1 AND run_items.item_key = v.column1 \
                       AND EXISTS (SELECT 1 FROM runs WHERE id = $1 AND lease_owner = $3)",
                    placeholders(chunk.len(), 7, 4)
                )
            };
            let mut values = Vec::with_capacity(3 + chunk.len() * 7);
            values.extend([text(run.as_str()), big(millis(now)), text(owner)]);
            for outcome in chunk {
                values.extend([
                    text(outcome.key.clone()),
                    text(outcome.status.as_str()),
                    Value::Int(Some(i32::try_from(outcome.attempts).unwrap_or(i32::MAX))),
                    optional_big(outcome.next_attempt_at.map(millis)),
                    optional_text(outcome.error.clone()),
                    json(outcome.result.clone()),
                    json(outcome.request_context.clone()),
                ]);
            }
            let updated = txn
                .execute_raw(self.statement(&sql, values))
                .await
                .map_err(db_error)?
                .rows_affected();
            if updated != u64::try_from(chunk.len()).unwrap_or(u64::MAX) {
                txn.rollback().await.map_err(db_error)?;
                let held = self
                    .db
                    .query_one_raw(self.statement(
                        "SELECT 1 AS held FROM runs WHERE id = $1 AND lease_owner = $2",
                        vec![text(run.as_str()), text(owner)],
                    ))
                    .await
                    .map_err(db_error)?;
                return Err(match held {
                    None => StoreError::LeaseLost(format!(
                        "{owner} does not hold the lease on run {run}"
                    )),
                    Some(_) => StoreError::Unexpected(format!(
                        "only {updated} of {} outcomes name an item of run {run}",
                        chunk.len()
                    )),
                });
            }
        }
        txn.commit().await.map_err(db_error)
    }

    async fn next_due(&self, run: &RunId) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT MIN(COALESCE(next_attempt_ms, 0)) AS due \
                 FROM run_items WHERE run_id = $1 AND status = 'pending'",
                vec![text(run.as_str())],
            ))
            .await
            .map_err(db_error)?;
        let due: Option<i64> = match row {
            Some(row) => row.try_get("", "due").map_err(db_error)?,
            None => None,
        };
        due.map(crate::convert::instant).transpose()
    }

    async fn cancel_pending(&self, run: &RunId, now: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(self
            .db
            .execute_raw(self.statement(
                "UPDATE run_items SET status = 'cancelled', updated_ms = $2 \
                 WHERE run_id = $1 AND status = 'pending'",
                vec![text(run.as_str()), big(millis(now))],
            ))
            .await
            .map_err(db_error)?
            .rows_affected())
    }

    async fn finish_run(
        &self,
        run: &RunId,
        owner: &str,
        status: RunStatus,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let finished = self
            .db
            .execute_raw(self.statement(
                "UPDATE runs SET status = $3, finished_ms = $4, lease_owner = NULL, \
                     lease_expires_ms = NULL \
                 WHERE id = $1 AND lease_owner = $2",
                vec![
                    text(run.as_str()),
                    text(owner),
                    text(status.as_str()),
                    big(millis(now)),
                ],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        if finished == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost(format!(
                "{owner} does not hold the lease on run {run}"
            )))
        }
    }

    async fn run(&self, tenant: &TenantId, run: &RunId) -> Result<RunRecord, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND tenant = $2");
        let row = self
            .db
            .query_one_raw(self.statement(&sql, vec![text(run.as_str()), text(tenant.as_str())]))
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::NotFound(format!("run {run}")))?;
        run_record(&row)
    }

    async fn counts(&self, run: &RunId) -> Result<ItemCounts, StoreError> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT status, COUNT(*) AS n FROM run_items WHERE run_id = $1 GROUP BY status",
                vec![text(run.as_str())],
            ))
            .await
            .map_err(db_error)?;
        let mut counts = ItemCounts::default();
        for row in rows {
            let status: String = row.try_get("", "status").map_err(db_error)?;
            let n: i64 = row.try_get("", "n").map_err(db_error)?;
            let status: ItemStatus = status
                .parse()
                .map_err(|e| StoreError::Unexpected(format!("stored item status: {e}")))?;
            counts.add(status, u64::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }

    async fn list_items(
        &self,
        tenant: &TenantId,
        run: &RunId,
        status: Option<ItemStatus>,
        after_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<ItemRecord>, StoreError> {
        // Another tenant's run answers exactly like a missing one.
        self.run(tenant, run).await?;
        let mut values = vec![
            text(run.as_str()),
            big(after_seq.unwrap_or(0)),
            big(i64::try_from(limit).unwrap_or(i64::MAX)),
        ];
        let status_filter = match status {
            Some(status) => {
                values.push(text(status.as_str()));
                " AND status = $4"
            }
            None => "",
        };
        let sql = format!(
            "SELECT {ITEM_COLUMNS} FROM run_items \
             WHERE run_id = $1 AND seq > $2{status_filter} ORDER BY seq LIMIT $3"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(&sql, values))
            .await
            .map_err(db_error)?;
        rows.iter().map(item_record).collect()
    }

    async fn list_runs(
        &self,
        filter: &RunFilter,
        cursor: Option<&RunCursor>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut values: Vec<Value> = Vec::new();
        let bind = |value: Value, values: &mut Vec<Value>| {
            values.push(value);
            format!("${}", values.len())
        };
        if let Some(tenant) = &filter.tenant {
            let p = bind(text(tenant.as_str()), &mut values);
            conditions.push(format!("tenant = {p}"));
        }
        if let Some(jobs) = &filter.jobs {
            if jobs.is_empty() {
                return Ok(Vec::new());
            }
            let list: Vec<String> = jobs
                .iter()
                .map(|j| bind(text(j.as_str()), &mut values))
                .collect();
            conditions.push(format!("job_id IN ({})", list.join(", ")));
        }
        if let Some(status) = filter.status {
            let p = bind(text(status.as_str()), &mut values);
            conditions.push(format!("status = {p}"));
        }
        if let Some(user) = &filter.user {
            let p = bind(text(user.as_str()), &mut values);
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM run_items i WHERE i.run_id = runs.id AND i.user_id = {p})"
            ));
        }
        if let Some(from) = filter.created_from {
            let p = bind(big(millis(from)), &mut values);
            conditions.push(format!("created_ms >= {p}"));
        }
        if let Some(until) = filter.created_until {
            let p = bind(big(millis(until)), &mut values);
            conditions.push(format!("created_ms < {p}"));
        }
        if let Some(cursor) = cursor {
            let at = bind(big(millis(cursor.created_at)), &mut values);
            let id = bind(text(cursor.run.as_str()), &mut values);
            conditions.push(format!(
                "(created_ms < {at} OR (created_ms = {at} AND id < {id}))"
            ));
        }
        let limit = bind(big(i64::try_from(limit).unwrap_or(i64::MAX)), &mut values);
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs {filter} ORDER BY created_ms DESC, id DESC LIMIT {limit}"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(&sql, values))
            .await
            .map_err(db_error)?;
        rows.iter().map(run_record).collect()
    }

    async fn queued_runs(&self) -> Result<u64, StoreError> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT COUNT(*) AS queued FROM runs WHERE status = 'queued'",
                vec![],
            ))
            .await
            .map_err(db_error)?;
        let queued: i64 = row
            .map(|row| row.try_get("", "queued"))
            .transpose()
            .map_err(db_error)?
            .unwrap_or(0);
        Ok(u64::try_from(queued).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::placeholders;

    #[test]
    fn placeholders_number_rows_and_columns() {
        assert_eq!(placeholders(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(1, 2, 3), "($3, $4)");
    }
}
