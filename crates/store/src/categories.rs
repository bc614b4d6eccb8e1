//! [`CategoryRepository`] over `categories` and `category_items`, with filters compiled to SQL
//! for each backend: `item_key` is a typed column (filter field `key`); every other field is a
//! key of the item's JSON `attributes`.

use async_trait::async_trait;
use batch_domain::TenantId;
use batch_domain::config::{CategorySelection, Condition, Filter};
use batch_ports::{CategoryItem, CategoryRepository, ItemPage, SourceError};
use sea_orm::{ConnectionTrait, DbBackend, Value};

use crate::Store;
use crate::convert::source_error;

/// Builds a `WHERE` clause, numbering parameters as it binds them.
pub(crate) struct Sql {
    pub(crate) backend: DbBackend,
    pub(crate) values: Vec<Value>,
    /// The typed column that filter field `key` names (`item_key`, `user_id`).
    pub(crate) key_column: &'static str,
}

impl Sql {
    pub(crate) fn bind(&mut self, value: Value) -> String {
        self.values.push(value);
        format!("${}", self.values.len())
    }

    /// A scalar as a native SQL value (SQLite compares `json_extract` results natively).
    fn scalar(value: &serde_json::Value) -> Value {
        match value {
            serde_json::Value::String(s) => Value::String(Some(s.clone())),
            serde_json::Value::Bool(b) => Value::BigInt(Some(i64::from(*b))),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::BigInt(Some(i)),
                None => Value::Double(n.as_f64()),
            },
            other => Value::String(Some(other.to_string())),
        }
    }

    fn number(value: &serde_json::Value) -> Value {
        Value::Double(value.as_f64())
    }

    fn key_text(value: &serde_json::Value) -> Value {
        match value {
            serde_json::Value::String(s) => Value::String(Some(s.clone())),
            other => Value::String(Some(other.to_string())),
        }
    }

    /// The SQL of one condition.
    pub(crate) fn condition(&mut self, filter: &Filter) -> String {
        if filter.field == "key" {
            return self.key_condition(&filter.condition);
        }
        let postgres = self.backend == DbBackend::Postgres;
        let path = if postgres {
            self.bind(Value::String(Some(filter.field.clone())))
        } else {
            self.bind(Value::String(Some(format!("$.{}", filter.field))))
        };
        let (value_sql, typed) = if postgres {
            (format!("(attributes -> {path})"), "jsonb_typeof")
        } else {
            (format!("json_extract(attributes, {path})"), "json_type")
        };
        match &filter.condition {
            Condition::Eq(v) => {
                let p = self.bind_eq(v);
                format!("{value_sql} = {p}")
            }
            Condition::In(list) => {
                let ps: Vec<String> = list.iter().map(|v| self.bind_eq(v)).collect();
                format!("{value_sql} IN ({})", ps.join(", "))
            }
            Condition::Range { gt, gte, lt, lte } => {
                let numeric = [gt, gte, lt, lte]
                    .into_iter()
                    .flatten()
                    .any(serde_json::Value::is_number);
                // CASE makes the type test run before the conversion on both backends.
                let operand = match (postgres, numeric) {
                    (true, true) => format!(
                        "(CASE WHEN {typed}(attributes -> {path}) = 'number' \
                         THEN (attributes ->> {path})::float8 END)"
                    ),
                    (true, false) => format!(
                        "(CASE WHEN {typed}(attributes -> {path}) = 'string' \
                         THEN (attributes ->> {path}) END)"
                    ),
                    (false, true) => format!(
                        "(CASE WHEN {typed}(attributes, {path}) IN ('integer', 'real') \
                         THEN json_extract(attributes, {path}) END)"
                    ),
                    (false, false) => format!(
                        "(CASE WHEN {typed}(attributes, {path}) = 'text' \
                         THEN json_extract(attributes, {path}) END)"
                    ),
                };
                let mut parts = Vec::new();
                for (op, bound) in [(">", gt), (">=", gte), ("<", lt), ("<=", lte)] {
                    if let Some(bound) = bound {
                        let value = if numeric {
                            Self::number(bound)
                        } else {
                            Self::key_text(bound)
                        };
                        let p = self.bind(value);
                        parts.push(format!("{operand} {op} {p}"));
                    }
                }
                parts.join(" AND ")
            }
        }
    }

    fn bind_eq(&mut self, value: &serde_json::Value) -> String {
        if self.backend == DbBackend::Postgres {
            self.bind(Value::Json(Some(Box::new(value.clone()))))
        } else {
            self.bind(Self::scalar(value))
        }
    }

    fn key_condition(&mut self, condition: &Condition) -> String {
        let key = self.key_column;
        match condition {
            Condition::Eq(v) => {
                let p = self.bind(Self::key_text(v));
                format!("{key} = {p}")
            }
            Condition::In(list) => {
                let ps: Vec<String> = list.iter().map(|v| self.bind(Self::key_text(v))).collect();
                format!("{key} IN ({})", ps.join(", "))
            }
            Condition::Range { gt, gte, lt, lte } => {
                let mut parts = Vec::new();
                for (op, bound) in [(">", gt), (">=", gte), ("<", lt), ("<=", lte)] {
                    if let Some(bound) = bound {
                        let p = self.bind(Self::key_text(bound));
                        parts.push(format!("{key} {op} {p}"));
                    }
                }
                parts.join(" AND ")
            }
        }
    }
}

#[async_trait]
impl CategoryRepository for Store {
    async fn items(
        &self,
        tenant: &TenantId,
        selection: &CategorySelection,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<ItemPage, SourceError> {
        let exists = self
            .db
            .query_one_raw(self.statement(
                "SELECT 1 AS found FROM categories WHERE tenant = $1 AND name = $2",
                vec![
                    Value::String(Some(tenant.as_str().to_owned())),
                    Value::String(Some(selection.name.clone())),
                ],
            ))
            .await
            .map_err(source_error)?;
        if exists.is_none() {
            return Err(SourceError::NotFound(format!(
                "category {:?} of tenant {tenant}",
                selection.name
            )));
        }
        let mut sql = Sql {
            key_column: "item_key",
            backend: self.backend(),
            values: vec![
                Value::String(Some(tenant.as_str().to_owned())),
                Value::String(Some(selection.name.clone())),
            ],
        };
        let mut filter = String::from("tenant = $1 AND category = $2");
        for f in &selection.filters {
            filter.push_str(" AND ");
            filter.push_str(&sql.condition(f));
        }
        let mut page_size = page_size;
        let mut after_clause = String::new();
        if let Some(after) = after {
            let p = sql.bind(Value::String(Some(after.to_owned())));
            // The limit counts from the first item: subtract what earlier pages returned.
            if let Some(limit) = selection.limit {
                let count_sql = format!(
                    "SELECT COUNT(*) AS n FROM category_items WHERE {filter} AND item_key <= {p}"
                );
                let row = self
                    .db
                    .query_one_raw(self.statement(&count_sql, sql.values.clone()))
                    .await
                    .map_err(source_error)?;
                let before: i64 = match row {
                    Some(row) => row.try_get("", "n").map_err(source_error)?,
                    None => 0,
                };
                let left = limit.saturating_sub(u64::try_from(before).unwrap_or(u64::MAX));
                page_size = page_size.min(usize::try_from(left).unwrap_or(usize::MAX));
            }
            after_clause = format!(" AND item_key > {p}");
        } else if let Some(limit) = selection.limit {
            page_size = page_size.min(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        if page_size == 0 {
            return Ok(ItemPage::default());
        }
        let limit = sql.bind(Value::BigInt(Some(
            i64::try_from(page_size).unwrap_or(i64::MAX),
        )));
        let query = format!(
            "SELECT item_key, attributes, user_refs FROM category_items \
             WHERE {filter}{after_clause} ORDER BY item_key LIMIT {limit}"
        );
        let rows = self
            .db
            .query_all_raw(self.statement(&query, sql.values))
            .await
            .map_err(source_error)?;
        let items = rows
            .iter()
            .map(|row| {
                let refs: serde_json::Value = row.try_get("", "user_refs").map_err(source_error)?;
                let user_refs = refs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| match r {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                Ok(CategoryItem {
                    category: selection.name.clone(),
                    key: row.try_get("", "item_key").map_err(source_error)?,
                    attributes: row.try_get("", "attributes").map_err(source_error)?,
                    user_refs,
                })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        Ok(ItemPage {
            items,
            stale_since: None,
        })
    }
}
