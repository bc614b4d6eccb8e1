//! Runs, their items and schedule occurrences.
//!
//! Instants are stored as milliseconds since the Unix epoch (`*_ms`, BIGINT) on both backends,
//! so comparisons and indexes behave the same in SQLite and PostgreSQL.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Runs {
    Table,
    Id,
    JobId,
    Tenant,
    Status,
    Trigger,
    Priority,
    ScheduledForMs,
    OccurrenceId,
    ParentId,
    CreatedMs,
    StartedMs,
    FinishedMs,
    LeaseOwner,
    LeaseExpiresMs,
}

#[derive(DeriveIden)]
enum RunItems {
    Table,
    RunId,
    Seq,
    ItemKey,
    UserId,
    Tenant,
    Status,
    Attempts,
    NextAttemptMs,
    LastError,
    Result,
    Payload,
    UpdatedMs,
}

#[derive(DeriveIden)]
enum Occurrences {
    Table,
    Id,
    JobId,
    Tenant,
    NominalMs,
    GroupKey,
    CreatedMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Runs::Table)
                    .col(string_len(Runs::Id, 64).primary_key())
                    .col(string_len(Runs::JobId, 128))
                    .col(string_len(Runs::Tenant, 128))
                    .col(string_len(Runs::Status, 32))
                    .col(string_len(Runs::Trigger, 16))
                    .col(small_integer(Runs::Priority))
                    .col(big_integer_null(Runs::ScheduledForMs))
                    .col(big_integer_null(Runs::OccurrenceId))
                    .col(string_len_null(Runs::ParentId, 64))
                    .col(big_integer(Runs::CreatedMs))
                    .col(big_integer_null(Runs::StartedMs))
                    .col(big_integer_null(Runs::FinishedMs))
                    .col(string_len_null(Runs::LeaseOwner, 256))
                    .col(big_integer_null(Runs::LeaseExpiresMs))
                    .to_owned(),
            )
            .await?;
        // Claiming scans unfinished runs by lease expiry; listing goes by tenant and job.
        manager
            .create_index(
                Index::create()
                    .name("runs_claim")
                    .table(Runs::Table)
                    .col(Runs::Status)
                    .col(Runs::LeaseExpiresMs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("runs_tenant_job")
                    .table(Runs::Table)
                    .col(Runs::Tenant)
                    .col(Runs::JobId)
                    .col(Runs::CreatedMs)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(RunItems::Table)
                    .col(string_len(RunItems::RunId, 64))
                    .col(big_integer(RunItems::Seq))
                    .col(string_len(RunItems::ItemKey, 512))
                    .col(string_len_null(RunItems::UserId, 256))
                    .col(string_len(RunItems::Tenant, 128))
                    .col(string_len(RunItems::Status, 16))
                    .col(integer(RunItems::Attempts).default(0))
                    .col(big_integer_null(RunItems::NextAttemptMs))
                    .col(text_null(RunItems::LastError))
                    .col(json_binary_null(RunItems::Result))
                    .col(json_binary(RunItems::Payload))
                    .col(big_integer(RunItems::UpdatedMs))
                    .primary_key(Index::create().col(RunItems::RunId).col(RunItems::Seq))
                    .foreign_key(
                        ForeignKey::create()
                            .name("run_items_run")
                            .from(RunItems::Table, RunItems::RunId)
                            .to(Runs::Table, Runs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("run_items_key")
                    .table(RunItems::Table)
                    .col(RunItems::RunId)
                    .col(RunItems::ItemKey)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("run_items_status")
                    .table(RunItems::Table)
                    .col(RunItems::RunId)
                    .col(RunItems::Status)
                    .col(RunItems::Seq)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Occurrences::Table)
                    .col(big_pk_auto(Occurrences::Id))
                    .col(string_len(Occurrences::JobId, 128))
                    .col(string_len(Occurrences::Tenant, 128))
                    .col(big_integer(Occurrences::NominalMs))
                    .col(string_len(Occurrences::GroupKey, 256).default(""))
                    .col(big_integer(Occurrences::CreatedMs))
                    .to_owned(),
            )
            .await?;
        // The key that makes a fire happen once, however many replicas try.
        manager
            .create_index(
                Index::create()
                    .name("occurrences_once")
                    .table(Occurrences::Table)
                    .col(Occurrences::JobId)
                    .col(Occurrences::NominalMs)
                    .col(Occurrences::GroupKey)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Occurrences::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(RunItems::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Runs::Table).to_owned())
            .await
    }
}
