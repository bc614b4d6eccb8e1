//! What overlap policies need from runs: `serial` runs wait until no other run of their job is
//! running, and `cancel_requested` lets any replica ask a run's owner to stop.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Runs {
    Table,
    JobId,
    Status,
    Serial,
    CancelRequested,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .add_column(boolean(Runs::Serial).default(false))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .add_column(boolean(Runs::CancelRequested).default(false))
                    .to_owned(),
            )
            .await?;
        // Claims look for other unfinished runs of the same job.
        manager
            .create_index(
                Index::create()
                    .name("runs_job_status")
                    .table(Runs::Table)
                    .col(Runs::JobId)
                    .col(Runs::Status)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("runs_job_status")
                    .table(Runs::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .drop_column(Runs::CancelRequested)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Runs::Table)
                    .drop_column(Runs::Serial)
                    .to_owned(),
            )
            .await
    }
}
