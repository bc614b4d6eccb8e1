//! Leases on items, so that several processors (on several replicas) can work on one run:
//! each claims a chunk of items for a while, and only the holder may record their outcomes.

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
        // SQLite adds one column per ALTER TABLE.
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

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
}
