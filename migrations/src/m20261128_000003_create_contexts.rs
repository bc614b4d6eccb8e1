//! Batch contexts, batch references, and the request context of each item.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum BatchContexts {
    Table,
    RunId,
    Tenant,
    Context,
    UpdatedMs,
}

#[derive(DeriveIden)]
enum BatchReferences {
    Table,
    RunId,
    UserId,
    Tenant,
    JobId,
    CreatedMs,
}

#[derive(DeriveIden)]
enum RunItems {
    Table,
    RequestContext,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(BatchContexts::Table)
                    .col(string_len(BatchContexts::RunId, 64).primary_key())
                    .col(string_len(BatchContexts::Tenant, 128))
                    .col(json_binary(BatchContexts::Context))
                    .col(big_integer(BatchContexts::UpdatedMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(BatchReferences::Table)
                    .col(string_len(BatchReferences::RunId, 64))
                    .col(string_len(BatchReferences::UserId, 256))
                    .col(string_len(BatchReferences::Tenant, 128))
                    .col(string_len(BatchReferences::JobId, 128))
                    .col(big_integer(BatchReferences::CreatedMs))
                    .primary_key(
                        Index::create()
                            .col(BatchReferences::RunId)
                            .col(BatchReferences::UserId),
                    )
                    .to_owned(),
            )
            .await?;
        // A user's references are listed newest first, page by page.
        manager
            .create_index(
                Index::create()
                    .name("batch_references_user")
                    .table(BatchReferences::Table)
                    .col(BatchReferences::Tenant)
                    .col(BatchReferences::UserId)
                    .col(BatchReferences::CreatedMs)
                    .col(BatchReferences::RunId)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(RunItems::Table)
                    .add_column(json_binary_null(RunItems::RequestContext))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RunItems::Table)
                    .drop_column(RunItems::RequestContext)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(BatchReferences::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(BatchContexts::Table).to_owned())
            .await
    }
}
