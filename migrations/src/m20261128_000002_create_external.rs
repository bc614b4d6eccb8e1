//! Tables other systems own in production, created for the embedded default and for tests:
//! `system_users`, `categories`, `category_items` and `user_preferences`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum SystemUsers {
    Table,
    Tenant,
    UserId,
    Active,
    Attributes,
}

#[derive(DeriveIden)]
enum Categories {
    Table,
    Tenant,
    Name,
}

#[derive(DeriveIden)]
enum CategoryItems {
    Table,
    Tenant,
    Category,
    ItemKey,
    Attributes,
    UserRefs,
}

#[derive(DeriveIden)]
enum UserPreferences {
    Table,
    Tenant,
    UserId,
    FeatureType,
    Frequency,
    TimeOfDay,
    TimeZone,
    Weekday,
    DayOfMonth,
    TemplateOverride,
    Parameters,
    Enabled,
    Version,
    ChangeSeq,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SystemUsers::Table)
                    .col(string_len(SystemUsers::Tenant, 128))
                    .col(string_len(SystemUsers::UserId, 256))
                    .col(boolean(SystemUsers::Active).default(true))
                    .col(json_binary_null(SystemUsers::Attributes))
                    .primary_key(
                        Index::create()
                            .col(SystemUsers::Tenant)
                            .col(SystemUsers::UserId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Categories::Table)
                    .col(string_len(Categories::Tenant, 128))
                    .col(string_len(Categories::Name, 128))
                    .primary_key(
                        Index::create()
                            .col(Categories::Tenant)
                            .col(Categories::Name),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(CategoryItems::Table)
                    .col(string_len(CategoryItems::Tenant, 128))
                    .col(string_len(CategoryItems::Category, 128))
                    .col(string_len(CategoryItems::ItemKey, 512))
                    .col(json_binary(CategoryItems::Attributes))
                    .col(json_binary(CategoryItems::UserRefs))
                    .primary_key(
                        Index::create()
                            .col(CategoryItems::Tenant)
                            .col(CategoryItems::Category)
                            .col(CategoryItems::ItemKey),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(UserPreferences::Table)
                    .col(string_len(UserPreferences::Tenant, 128))
                    .col(string_len(UserPreferences::UserId, 256))
                    .col(string_len(UserPreferences::FeatureType, 128))
                    .col(string_len_null(UserPreferences::Frequency, 16))
                    .col(string_len_null(UserPreferences::TimeOfDay, 8))
                    .col(string_len_null(UserPreferences::TimeZone, 64))
                    .col(string_len_null(UserPreferences::Weekday, 16))
                    .col(small_integer_null(UserPreferences::DayOfMonth))
                    .col(string_len_null(UserPreferences::TemplateOverride, 128))
                    .col(json_binary_null(UserPreferences::Parameters))
                    .col(boolean(UserPreferences::Enabled).default(true))
                    .col(big_integer(UserPreferences::Version).default(1))
                    .col(big_integer(UserPreferences::ChangeSeq).default(0))
                    .primary_key(
                        Index::create()
                            .col(UserPreferences::Tenant)
                            .col(UserPreferences::UserId)
                            .col(UserPreferences::FeatureType),
                    )
                    .to_owned(),
            )
            .await?;
        // Changes since a watermark are read by tenant, feature and change sequence.
        manager
            .create_index(
                Index::create()
                    .name("user_preferences_changes")
                    .table(UserPreferences::Table)
                    .col(UserPreferences::Tenant)
                    .col(UserPreferences::FeatureType)
                    .col(UserPreferences::ChangeSeq)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            UserPreferences::Table.into_iden(),
            CategoryItems::Table.into_iden(),
            Categories::Table.into_iden(),
            SystemUsers::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
