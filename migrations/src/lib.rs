//! Database migrations of agent-batch, on sea-orm-migration, for SQLite and PostgreSQL.
//!
//! Two migrators share one database without touching each other's tables:
//! * [`Migrator`] owns the service's own tables (runs, items, occurrences, …) and records its
//!   history in `seaql_migrations`;
//! * [`ExternalMigrator`] creates the tables that other systems own in production
//!   (`system_users`, categories and their items, user preferences) for the embedded default and
//!   for tests, recording its history in `seaql_migrations_external`.
//!
//! Each migration lives in its own `mYYYYMMDD_HHMMSS_name.rs` file and is never edited once it
//! has landed; changes come as new migrations.
#![forbid(unsafe_code)]

pub use sea_orm_migration::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m20261128_000001_create_runs;
mod m20261128_000002_create_external;
mod m20261128_000003_create_contexts;
mod m20261128_000004_item_leases;
mod m20261128_000005_schedule_states;
mod m20261128_000006_run_overlap;
mod m20261128_000007_groups_and_pauses;
mod m20261128_000008_jobs;
mod m20261129_000009_context_progress;
mod m20261206_000010_drop_item_leases;

/// The migrator of the service's own tables.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_runs::Migration),
            Box::new(m20261128_000003_create_contexts::Migration),
            Box::new(m20261128_000004_item_leases::Migration),
            Box::new(m20261128_000005_schedule_states::Migration),
            Box::new(m20261128_000006_run_overlap::Migration),
            Box::new(m20261128_000007_groups_and_pauses::Migration),
            Box::new(m20261128_000008_jobs::Migration),
            Box::new(m20261129_000009_context_progress::Migration),
            Box::new(m20261206_000010_drop_item_leases::Migration),
        ]
    }
}

/// The migrator of the tables other systems own in production.
#[derive(Debug)]
pub struct ExternalMigrator;

#[async_trait::async_trait]
impl MigratorTrait for ExternalMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261128_000002_create_external::Migration)]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("seaql_migrations_external").into_iden()
    }
}
