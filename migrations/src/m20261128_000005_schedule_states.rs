//! Durable schedule state (next unfired nominal instant and last fire, per job and group), and
//! at most one run per occurrence.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum ScheduleStates {
    Table,
    JobId,
    GroupKey,
    Tenant,
    NextNominalMs,
    LastFiredMs,
    UpdatedMs,
}

#[derive(DeriveIden)]
enum Runs {
    Table,
    OccurrenceId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ScheduleStates::Table)
                    .col(string_len(ScheduleStates::JobId, 128))
                    .col(string_len(ScheduleStates::GroupKey, 256).default(""))
                    .col(string_len(ScheduleStates::Tenant, 128))
                    .col(big_integer_null(ScheduleStates::NextNominalMs))
                    .col(big_integer_null(ScheduleStates::LastFiredMs))
                    .col(big_integer(ScheduleStates::UpdatedMs))
                    .primary_key(
                        Index::create()
                            .col(ScheduleStates::JobId)
                            .col(ScheduleStates::GroupKey),
                    )
                    .to_owned(),
            )
            .await?;
        // Due schedules are found in fire order, not by scanning every schedule.
        manager
            .create_index(
                Index::create()
                    .name("schedule_states_next")
                    .table(ScheduleStates::Table)
                    .col(ScheduleStates::NextNominalMs)
                    .to_owned(),
            )
            .await?;
        // A crash between creating an occurrence and its run is repaired by the next tick,
        // which finds the occurrence and creates the run; this index keeps it to one run.
        manager
            .create_index(
                Index::create()
                    .name("runs_occurrence_once")
                    .table(Runs::Table)
                    .col(Runs::OccurrenceId)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("runs_occurrence_once")
                    .table(Runs::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(ScheduleStates::Table).to_owned())
            .await
    }
}
