//! The job table: every job the service runs, from the jobs file (`origin = 'file'`, replaced
//! at every start) or created through the API (`origin = 'api'`), as its JSON definition; and a
//! one-row catalog version every change bumps, so replicas notice changes with one read.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Jobs {
    Table,
    JobId,
    Tenant,
    Definition,
    Origin,
    UpdatedMs,
}

#[derive(DeriveIden)]
enum JobCatalog {
    Table,
    Id,
    Version,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Jobs::Table)
                    .col(string_len(Jobs::JobId, 128).primary_key())
                    .col(string_len(Jobs::Tenant, 128))
                    .col(text(Jobs::Definition))
                    .col(string_len(Jobs::Origin, 16))
                    .col(big_integer(Jobs::UpdatedMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(JobCatalog::Table)
                    .col(integer(JobCatalog::Id).primary_key())
                    .col(big_integer(JobCatalog::Version))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(JobCatalog::Table)
                    .columns([JobCatalog::Id, JobCatalog::Version])
                    .values_panic([1.into(), 0.into()])
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobCatalog::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Jobs::Table).to_owned())
            .await
    }
}
