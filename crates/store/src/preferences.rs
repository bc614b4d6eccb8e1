//! [`PreferenceSource`] over the `user_preferences` table (the embedded default's stand-in for
//! the Config service), and writing preferences for fixtures and sample data.

use async_trait::async_trait;
use batch_domain::preference::{Frequency, Preference};
use batch_domain::time::{TimeOfDay, parse_weekday, weekday_name};
use batch_domain::{FeatureType, TemplateId, TenantId, UserId};
use batch_ports::runs::StoreError;
use batch_ports::{PreferencePage, PreferenceSource, SourceError};
use sea_orm::{ConnectionTrait, QueryResult, TransactionTrait, Value};

use crate::Store;
use crate::convert::{db_error, source_error};

const COLUMNS: &str = "tenant, user_id, feature_type, frequency, time_of_day, time_zone, weekday, \
    day_of_month, template_override, parameters, enabled, version, change_seq";

fn frequency_name(f: Frequency) -> &'static str {
    match f {
        Frequency::Hourly => "hourly",
        Frequency::Daily => "daily",
        Frequency::Weekly => "weekly",
        Frequency::Biweekly => "biweekly",
        Frequency::Monthly => "monthly",
    }
}

fn parse_frequency(text: &str) -> Option<Frequency> {
    match text {
        "hourly" => Some(Frequency::Hourly),
        "daily" => Some(Frequency::Daily),
        "weekly" => Some(Frequency::Weekly),
        "biweekly" => Some(Frequency::Biweekly),
        "monthly" => Some(Frequency::Monthly),
        _ => None,
    }
}

fn get<T: sea_orm::TryGetable>(row: &QueryResult, column: &str) -> Result<T, SourceError> {
    row.try_get("", column).map_err(source_error)
}

/// A stored row as a preference. Values users typed wrong (an unknown frequency, `7pm`) read as
/// unset, so the job's defaults apply; a bad time zone stays text for the fallback chain to
/// report.
fn preference(row: &QueryResult) -> Result<Preference, SourceError> {
    let corrupt =
        |e: batch_domain::ids::Error| SourceError::Unexpected(format!("stored preference: {e}"));
    let parameters: Option<serde_json::Value> = get(row, "parameters")?;
    Ok(Preference {
        tenant: TenantId::parse(get::<String>(row, "tenant")?).map_err(corrupt)?,
        user: UserId::parse(get::<String>(row, "user_id")?).map_err(corrupt)?,
        feature_type: FeatureType::parse(get::<String>(row, "feature_type")?).map_err(corrupt)?,
        frequency: get::<Option<String>>(row, "frequency")?.and_then(|f| parse_frequency(&f)),
        time_of_day: get::<Option<String>>(row, "time_of_day")?
            .and_then(|t| TimeOfDay::parse(&t).ok()),
        time_zone: get(row, "time_zone")?,
        weekday: get::<Option<String>>(row, "weekday")?.and_then(|d| parse_weekday(&d).ok()),
        day_of_month: get::<Option<i16>>(row, "day_of_month")?.and_then(|d| u32::try_from(d).ok()),
        template_override: get::<Option<String>>(row, "template_override")?
            .and_then(|t| TemplateId::parse(t).ok()),
        parameters: match parameters {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        },
        enabled: get(row, "enabled")?,
        version: u64::try_from(get::<i64>(row, "version")?).unwrap_or(0),
    })
}

/// Page tokens are the hex of the last user id of the page: opaque to callers, and safe in URLs.
fn encode_token(user: &str) -> String {
    user.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Result<String, SourceError> {
    let bad = || SourceError::Unexpected(format!("page token {token:?} is not valid"));
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).unwrap_or("zz"), 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    String::from_utf8(bytes).map_err(|_| bad())
}

impl Store {
    /// Creates or replaces preferences (for the embedded default's sample data and for tests).
    /// Each call is one change: every row it writes gets the next change number, and a replaced
    /// row's version goes up by one.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    pub async fn upsert_preferences(&self, preferences: &[Preference]) -> Result<u64, StoreError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let seq = self.upsert_preferences_in(&txn, preferences).await?;
        txn.commit().await.map_err(db_error)?;
        Ok(seq)
    }

    /// [`Store::upsert_preferences`] inside a caller's transaction.
    pub(crate) async fn upsert_preferences_in<C: ConnectionTrait>(
        &self,
        txn: &C,
        preferences: &[Preference],
    ) -> Result<u64, StoreError> {
        let row = txn
            .query_one_raw(self.statement(
                "SELECT COALESCE(MAX(change_seq), 0) AS seq FROM user_preferences",
                vec![],
            ))
            .await
            .map_err(db_error)?;
        let seq: i64 = match row {
            Some(row) => row.try_get("", "seq").map_err(db_error)?,
            None => 0,
        } + 1;
        for chunk in preferences.chunks(500) {
            let width = 12;
            let rows = (0..chunk.len())
                .map(|r| {
                    let cols = (1..=width)
                        .map(|c| format!("${}", r * width + c))
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!("({cols}, ${})", chunk.len() * width + 1)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO user_preferences ({COLUMNS}) VALUES {rows} \
                 ON CONFLICT (tenant, user_id, feature_type) DO UPDATE SET \
                   frequency = excluded.frequency, time_of_day = excluded.time_of_day, \
                   time_zone = excluded.time_zone, weekday = excluded.weekday, \
                   day_of_month = excluded.day_of_month, \
                   template_override = excluded.template_override, \
                   parameters = excluded.parameters, enabled = excluded.enabled, \
                   version = user_preferences.version + 1, change_seq = excluded.change_seq"
            );
            let mut values = Vec::with_capacity(chunk.len() * width + 1);
            for p in chunk {
                values.extend([
                    Value::String(Some(p.tenant.to_string())),
                    Value::String(Some(p.user.to_string())),
                    Value::String(Some(p.feature_type.to_string())),
                    Value::String(p.frequency.map(|f| frequency_name(f).to_owned())),
                    Value::String(p.time_of_day.map(|t| t.to_string())),
                    Value::String(p.time_zone.clone()),
                    Value::String(p.weekday.map(|d| weekday_name(d).to_owned())),
                    Value::SmallInt(p.day_of_month.and_then(|d| i16::try_from(d).ok())),
                    Value::String(p.template_override.as_ref().map(ToString::to_string)),
                    Value::Json(Some(Box::new(serde_json::Value::Object(
                        p.parameters.clone(),
                    )))),
                    Value::Bool(Some(p.enabled)),
                    Value::BigInt(Some(i64::try_from(p.version).unwrap_or(1))),
                ]);
            }
            values.push(Value::BigInt(Some(seq)));
            txn.execute_raw(self.statement(&sql, values))
                .await
                .map_err(db_error)?;
        }
        Ok(u64::try_from(seq).unwrap_or(0))
    }
}

#[async_trait]
impl PreferenceSource for Store {
    async fn list(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<PreferencePage, SourceError> {
        let after = page_token
            .map(decode_token)
            .transpose()?
            .unwrap_or_default();
        let sql = format!(
            "SELECT {COLUMNS} FROM user_preferences \
             WHERE tenant = $1 AND feature_type = $2 AND user_id > $3 ORDER BY user_id LIMIT $4"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(
                &sql,
                vec![
                    Value::String(Some(tenant.to_string())),
                    Value::String(Some(feature.to_string())),
                    Value::String(Some(after)),
                    Value::BigInt(Some(i64::try_from(page_size).unwrap_or(i64::MAX))),
                ],
            ))
            .await
            .map_err(source_error)?;
        let preferences = rows.iter().map(preference).collect::<Result<Vec<_>, _>>()?;
        let next_page = (preferences.len() == page_size && page_size > 0)
            .then(|| preferences.last().map(|p| encode_token(p.user.as_str())))
            .flatten();
        Ok(PreferencePage {
            preferences,
            next_page,
            stale_since: None,
        })
    }

    async fn changes_since(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        watermark: u64,
    ) -> Result<(Vec<Preference>, u64), SourceError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM user_preferences \
             WHERE tenant = $1 AND feature_type = $2 AND change_seq > $3 ORDER BY change_seq, user_id"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(
                &sql,
                vec![
                    Value::String(Some(tenant.to_string())),
                    Value::String(Some(feature.to_string())),
                    Value::BigInt(Some(i64::try_from(watermark).unwrap_or(i64::MAX))),
                ],
            ))
            .await
            .map_err(source_error)?;
        let mut high = watermark;
        for row in &rows {
            high = high.max(u64::try_from(get::<i64>(row, "change_seq")?).unwrap_or(0));
        }
        let preferences = rows.iter().map(preference).collect::<Result<Vec<_>, _>>()?;
        Ok((preferences, high))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for user in ["u1", "alice@acme", "ü"] {
            assert_eq!(decode_token(&encode_token(user)).unwrap(), user);
        }
        for bad in ["zz", "abc", "ff"] {
            assert!(decode_token(bad).is_err(), "{bad}");
        }
    }
}
