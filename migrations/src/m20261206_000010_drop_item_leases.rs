//! Drops the items' own leases: the run's lease covers its items, since only the holder of a
//! run's lease executes and records them. Writing a lease on every claimed item row cost more
//! of PostgreSQL's time than anything else a chunk does (benchmark P1, issue 8); items are now
//! read, not updated, when an execution takes them. Leases an older version left on items are
//! dropped with the columns: the runs' leases still say who holds what. Replicas of an older
//! version write those columns, so every replica is stopped before this migration runs (no
//! rolling upgrade across it).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum RunItems {
    Table,
    LeaseOwner,
    LeaseExpiresMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite drops one column per ALTER TABLE.
        manager
            .alter_table(
                Table::alter()
                    .table(RunItems::Table)
                    .drop_column(RunItems::LeaseExpiresMs)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(RunItems::Table)
                    .drop_column(RunItems::LeaseOwner)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RunItems::Table)
                    .add_column(string_len_null(RunItems::LeaseOwner, 256))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(RunItems::Table)
                    .add_column(big_integer_null(RunItems::LeaseExpiresMs))
                    .to_owned(),
            )
            .await
    }
}
