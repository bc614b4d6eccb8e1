//! Sample data for the embedded default: users, categories and preferences read from a
//! directory (`config/sample-data/`) into the stand-in tables of an empty database.

use std::path::Path;

use batch_domain::preference::{Frequency, Preference};
use batch_domain::time::{TimeOfDay, parse_weekday};
use batch_domain::{FeatureType, TemplateId, TenantId, UserId};
use batch_ports::runs::StoreError;
use sea_orm::{ConnectionTrait, TransactionTrait, Value};
use serde::Deserialize;
use serde_json::Map;

use crate::Store;
use crate::convert::db_error;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRow {
    tenant: String,
    id: String,
    #[serde(default = "yes")]
    active: bool,
    #[serde(default)]
    attributes: serde_json::Value,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryRow {
    tenant: String,
    name: String,
    items: Vec<ItemRow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemRow {
    key: String,
    #[serde(default)]
    attributes: serde_json::Value,
    #[serde(default)]
    user_refs: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferenceRow {
    tenant: String,
    user_id: String,
    feature_type: String,
    frequency: Option<String>,
    time_of_day: Option<String>,
    time_zone: Option<String>,
    weekday: Option<String>,
    day_of_month: Option<u32>,
    template_override: Option<String>,
    #[serde(default)]
    parameters: Map<String, serde_json::Value>,
    #[serde(default = "yes")]
    enabled: bool,
}

/// What [`Store::seed_sample_data`] loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SampleCounts {
    /// Users.
    pub users: usize,
    /// Categories.
    pub categories: usize,
    /// Category items.
    pub items: usize,
    /// Preferences.
    pub preferences: usize,
}

fn read<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<T, StoreError> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        StoreError::Unexpected(format!("reading sample data {}: {e}", path.display()))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| StoreError::Unexpected(format!("sample data {}: {e}", path.display())))
}

fn bad(file: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Unexpected(format!("sample data {file}: {what}"))
}

fn preference(row: PreferenceRow) -> Result<Preference, StoreError> {
    let file = "preferences.json";
    let frequency = match row.frequency.as_deref() {
        None => None,
        Some("hourly") => Some(Frequency::Hourly),
        Some("daily") => Some(Frequency::Daily),
        Some("weekly") => Some(Frequency::Weekly),
        Some("biweekly") => Some(Frequency::Biweekly),
        Some("monthly") => Some(Frequency::Monthly),
        Some(other) => return Err(bad(file, format!("{other:?} is not a frequency"))),
    };
    Ok(Preference {
        tenant: TenantId::parse(row.tenant).map_err(|e| bad(file, e))?,
        user: UserId::parse(row.user_id).map_err(|e| bad(file, e))?,
        feature_type: FeatureType::parse(row.feature_type).map_err(|e| bad(file, e))?,
        frequency,
        time_of_day: row
            .time_of_day
            .map(|t| TimeOfDay::parse(&t))
            .transpose()
            .map_err(|e| bad(file, e))?,
        // Kept as written: a wrong zone is part of the sample, to show the fallback.
        time_zone: row.time_zone,
        weekday: row
            .weekday
            .map(|d| parse_weekday(&d))
            .transpose()
            .map_err(|e| bad(file, e))?,
        day_of_month: row.day_of_month,
        template_override: row
            .template_override
            .map(TemplateId::parse)
            .transpose()
            .map_err(|e| bad(file, e))?,
        parameters: row.parameters,
        enabled: row.enabled,
        version: 1,
    })
}

impl Store {
    /// Loads `users.json`, `categories.json` and `preferences.json` from `dir` into the
    /// stand-in tables, but only when `system_users` is empty: data that is there already is
    /// never touched. Returns what was loaded, or `None` when nothing was.
    ///
    /// # Errors
    /// [`StoreError::Unexpected`] naming the file that cannot be read or parsed; nothing is
    /// loaded then.
    pub async fn seed_sample_data(&self, dir: &Path) -> Result<Option<SampleCounts>, StoreError> {
        let row = self
            .db
            .query_one_raw(self.statement("SELECT COUNT(*) AS n FROM system_users", vec![]))
            .await
            .map_err(db_error)?;
        let existing: i64 = match row {
            Some(row) => row.try_get("", "n").map_err(db_error)?,
            None => 0,
        };
        if existing > 0 {
            return Ok(None);
        }
        // Read and check everything before writing anything.
        let users: Vec<UserRow> = read(dir, "users.json")?;
        let categories: Vec<CategoryRow> = read(dir, "categories.json")?;
        let preferences = read::<Vec<PreferenceRow>>(dir, "preferences.json")?
            .into_iter()
            .map(preference)
            .collect::<Result<Vec<_>, _>>()?;
        let counts = SampleCounts {
            users: users.len(),
            categories: categories.len(),
            items: categories.iter().map(|c| c.items.len()).sum(),
            preferences: preferences.len(),
        };
        let txn = self.db.begin().await.map_err(db_error)?;
        for chunk in users.chunks(500) {
            let rows = (0..chunk.len())
                .map(|i| {
                    format!(
                        "(${}, ${}, ${}, ${})",
                        i * 4 + 1,
                        i * 4 + 2,
                        i * 4 + 3,
                        i * 4 + 4
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let mut values = Vec::with_capacity(chunk.len() * 4);
            for u in chunk {
                values.extend([
                    Value::String(Some(u.tenant.clone())),
                    Value::String(Some(u.id.clone())),
                    Value::Bool(Some(u.active)),
                    Value::Json(Some(Box::new(u.attributes.clone()))),
                ]);
            }
            txn.execute_raw(self.statement(
                &format!(
                    "INSERT INTO system_users (tenant, user_id, active, attributes) VALUES {rows}"
                ),
                values,
            ))
            .await
            .map_err(db_error)?;
        }
        for category in &categories {
            txn.execute_raw(self.statement(
                "INSERT INTO categories (tenant, name) VALUES ($1, $2)",
                vec![
                    Value::String(Some(category.tenant.clone())),
                    Value::String(Some(category.name.clone())),
                ],
            ))
            .await
            .map_err(db_error)?;
            for chunk in category.items.chunks(500) {
                let rows = (0..chunk.len())
                    .map(|i| format!("($1, $2, ${}, ${}, ${})", i * 3 + 3, i * 3 + 4, i * 3 + 5))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut values = vec![
                    Value::String(Some(category.tenant.clone())),
                    Value::String(Some(category.name.clone())),
                ];
                for item in chunk {
                    values.extend([
                        Value::String(Some(item.key.clone())),
                        Value::Json(Some(Box::new(item.attributes.clone()))),
                        Value::Json(Some(Box::new(serde_json::json!(item.user_refs)))),
                    ]);
                }
                txn.execute_raw(self.statement(
                    &format!(
                        "INSERT INTO category_items (tenant, category, item_key, attributes, user_refs) VALUES {rows}"
                    ),
                    values,
                ))
                .await
                .map_err(db_error)?;
            }
        }
        self.upsert_preferences_in(&txn, &preferences).await?;
        txn.commit().await.map_err(db_error)?;
        Ok(Some(counts))
    }
}
