//! A context's progress in a column of its own: a run's progress changes after every chunk,
//! and rewriting the whole context (whose item lists grow with the run) each time made
//! recording a large run quadratic. `NULL` means the progress inside the context is current.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum BatchContexts {
    Table,
    Progress,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(BatchContexts::Table)
                    .add_column(json_binary_null(BatchContexts::Progress))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(BatchContexts::Table)
                    .drop_column(BatchContexts::Progress)
                    .to_owned(),
            )
            .await
    }
}
