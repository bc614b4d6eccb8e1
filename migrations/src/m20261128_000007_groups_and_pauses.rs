//! Preference groups, paused jobs and fair claims: each run remembers the schedule group it fired for (so
//! overlap and serial claims hold per group), and `job_pauses` holds the jobs whose schedules
//! are paused, with the note given, so every replica sees a pause; indexes serve the global
//! run limit and tenant loads.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Runs {
    Table,
    JobId,
    GroupKey,
    Status,
    LeaseExpiresMs,
    StartedMs,
}

#[derive(DeriveIden)]
enum JobPauses {
    Table,
    JobId,
    Tenant,
    Note,
    PausedMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .add_column(string_len(Runs::GroupKey, 256).default(""))
                    .to_owned(),
            )
            .await?;
        // Claims look for other unfinished runs of the same job and group.
        manager
            .create_index(
                Index::create()
                    .name("runs_job_group_status")
                    .table(Runs::Table)
                    .col(Runs::JobId)
                    .col(Runs::GroupKey)
                    .col(Runs::Status)
                    .to_owned(),
            )
            .await?;
        // Counting live leases (the global limit) and finding claimable runs.
        manager
            .create_index(
                Index::create()
                    .name("runs_status_lease")
                    .table(Runs::Table)
                    .col(Runs::Status)
                    .col(Runs::LeaseExpiresMs)
                    .to_owned(),
            )
            .await?;
        // Tenant loads count the runs started recently.
        manager
            .create_index(
                Index::create()
                    .name("runs_started")
                    .table(Runs::Table)
                    .col(Runs::StartedMs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(JobPauses::Table)
                    .col(string(JobPauses::JobId).primary_key())
                    .col(string(JobPauses::Tenant))
                    .col(text(JobPauses::Note))
                    .col(big_integer(JobPauses::PausedMs))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobPauses::Table).to_owned())
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("runs_started")
                    .table(Runs::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("runs_status_lease")
                    .table(Runs::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("runs_job_group_status")
                    .table(Runs::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .drop_column(Runs::GroupKey)
                    .to_owned(),
            )
            .await
    }
}
