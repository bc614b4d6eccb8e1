//! Local stand-ins for the Template and Request services.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use batch_domain::retry::FailureKind;
use batch_domain::{TemplateId, TenantId};
use batch_ports::{ExecuteError, Request, RequestExecutor, SourceError, Template, TemplateSource};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Why the template directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or the directory could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A template file is not a valid template.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The JSON shape of a template file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    id: String,
    #[serde(default = "first_version")]
    version: u32,
    body: String,
    #[serde(default)]
    parameter_defaults: Map<String, Value>,
}

fn first_version() -> u32 {
    1
}

/// Templates from a directory: `<dir>/<id>.json` for every tenant, `<dir>/<tenant>/<id>.json`
/// for one tenant (it wins over the shared one). Each file holds `id`, `version` (default 1),
/// `body` (minijinja) and `parameter_defaults`. Files are read and checked once, at load.
#[derive(Debug, Clone, Default)]
pub struct FileTemplates {
    shared: HashMap<String, Template>,
    by_tenant: HashMap<(String, String), Template>,
}

fn read_template(path: &Path) -> Result<Template, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |message: String| LoadError::Invalid {
        path: path.to_owned(),
        message,
    };
    let file: TemplateFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if file.id != stem {
        return Err(invalid(format!(
            "id {:?} does not match the file name {stem:?}",
            file.id
        )));
    }
    let id = TemplateId::parse(file.id).map_err(|e| invalid(format!("id {e}")))?;
    // Reject bodies that do not compile now rather than at the first request.
    minijinja::Environment::new()
        .template_from_str(&file.body)
        .map_err(|e| invalid(format!("body is not a valid template: {e}")))?;
    Ok(Template {
        id,
        version: file.version,
        body: file.body,
        parameter_defaults: file.parameter_defaults,
    })
}

fn json_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| LoadError::Read {
                path: dir.to_owned(),
                source,
            })?
            .path();
        files.push(path);
    }
    files.sort();
    Ok(files)
}

impl FileTemplates {
    /// Loads every template under `dir`.
    ///
    /// # Errors
    /// [`LoadError`] naming the file that cannot be read or is not a valid template.
    pub fn load(dir: &Path) -> Result<FileTemplates, LoadError> {
        let mut templates = FileTemplates::default();
        for path in json_files(dir)? {
            if path.is_dir() {
                let tenant = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned();
                for file in json_files(&path)? {
                    if file.extension().is_some_and(|e| e == "json") {
                        let template = read_template(&file)?;
                        templates
                            .by_tenant
                            .insert((tenant.clone(), template.id.to_string()), template);
                    }
                }
            } else if path.extension().is_some_and(|e| e == "json") {
                let template = read_template(&path)?;
                templates.shared.insert(template.id.to_string(), template);
            }
        }
        Ok(templates)
    }
}

#[async_trait]
impl TemplateSource for FileTemplates {
    async fn template(
        &self,
        tenant: &TenantId,
        id: &TemplateId,
        version: Option<u32>,
    ) -> Result<Template, SourceError> {
        let template = self
            .by_tenant
            .get(&(tenant.to_string(), id.to_string()))
            .or_else(|| self.shared.get(id.as_str()))
            .ok_or_else(|| SourceError::NotFound(format!("template {id}")))?;
        match version {
            Some(v) if v != template.version => Err(SourceError::NotFound(format!(
                "template {id} version {v} (the directory has version {})",
                template.version
            ))),
            _ => Ok(template.clone()),
        }
    }
}

/// Executes a request by rendering its template: the body sees the payload's fields at the top
/// level and as `payload`, plus `parameters`, `user_id`, `tenant` and `idempotency_key`. The
/// result is `{"text": …, "template": …, "version": …}`.
pub struct RenderingExecutor {
    templates: Arc<dyn TemplateSource>,
}

impl RenderingExecutor {
    /// An executor that takes templates from `templates`.
    pub fn new(templates: Arc<dyn TemplateSource>) -> Self {
        RenderingExecutor { templates }
    }
}

#[async_trait]
impl RequestExecutor for RenderingExecutor {
    async fn execute(&self, request: Request) -> Result<Value, ExecuteError> {
        let template = self
            .templates
            .template(&request.tenant, &request.template, request.template_version)
            .await
            .map_err(|e| ExecuteError {
                kind: e.kind(),
                message: e.to_string(),
            })?;
        let mut context = match &request.payload {
            Value::Object(fields) => fields.clone(),
            other => {
                let mut m = Map::new();
                m.insert("value".to_owned(), other.clone());
                m
            }
        };
        context.insert("payload".to_owned(), request.payload.clone());
        context.insert(
            "parameters".to_owned(),
            Value::Object(request.parameters.clone()),
        );
        context.insert(
            "user_id".to_owned(),
            request
                .user
                .as_ref()
                .map_or(Value::Null, |u| json!(u.as_str())),
        );
        context.insert("tenant".to_owned(), json!(request.tenant.as_str()));
        context.insert("idempotency_key".to_owned(), json!(request.idempotency_key));
        let text = minijinja::Environment::new()
            .render_str(&template.body, Value::Object(context))
            .map_err(|e| ExecuteError {
                kind: FailureKind::Permanent,
                message: format!("rendering template {}: {e}", template.id),
            })?;
        Ok(json!({ "text": text, "template": template.id.as_str(), "version": template.version }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "batch-templates-{}-{}",
            std::process::id(),
            files.len() + files.first().map_or(0, |f| f.0.len() * 31 + f.1.len())
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    fn request(template: &str, payload: Value) -> Request {
        Request {
            idempotency_key: "run:u1".to_owned(),
            tenant: TenantId::parse("acme").unwrap(),
            user: Some(batch_domain::UserId::parse("u1").unwrap()),
            template: TemplateId::parse(template).unwrap(),
            template_version: None,
            payload,
            parameters: json!({"tone": "warm"}).as_object().unwrap().clone(),
            timeout: None,
        }
    }

    #[tokio::test]
    async fn templates_render_with_item_data_and_parameters() {
        let dir = dir(&[
            (
                "digest.json",
                r#"{"id": "digest", "version": 3, "body": "Hi {{ user_id }}, {{ n }} items ({{ parameters.tone }})", "parameter_defaults": {"tone": "neutral"}}"#,
            ),
            (
                "acme/digest.json",
                r#"{"id": "digest", "body": "ACME {{ user_id }}"}"#,
            ),
        ]);
        let templates = Arc::new(FileTemplates::load(&dir).unwrap());
        let shared = templates
            .template(
                &TenantId::parse("globex").unwrap(),
                &TemplateId::parse("digest").unwrap(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            (shared.version, shared.parameter_defaults["tone"].clone()),
            (3, json!("neutral"))
        );
        let executor = RenderingExecutor::new(templates.clone());
        let result = executor
            .execute(request("digest", json!({"n": 4})))
            .await
            .unwrap();
        assert_eq!(result["text"], "ACME u1", "the tenant's own template wins");
        let mut other = request("digest", json!({"n": 4}));
        other.tenant = TenantId::parse("globex").unwrap();
        let result = executor.execute(other).await.unwrap();
        assert_eq!(result["text"], "Hi u1, 4 items (warm)");
        let missing = executor
            .execute(request("nope", json!({})))
            .await
            .unwrap_err();
        assert_eq!(missing.kind, FailureKind::Permanent);
        let mut pinned = request("digest", json!({}));
        pinned.tenant = TenantId::parse("globex").unwrap();
        pinned.template_version = Some(2);
        assert!(executor.execute(pinned).await.is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn broken_template_files_are_named() {
        for (name, text, fragment) in [
            ("a.json", "{not json", "a.json"),
            (
                "b.json",
                r#"{"id": "other", "body": "x"}"#,
                "does not match the file name",
            ),
            (
                "c.json",
                r#"{"id": "c", "body": "{% if %}"}"#,
                "not a valid template",
            ),
            (
                "d.json",
                r#"{"id": "d", "body": "x", "colour": 1}"#,
                "unknown field",
            ),
        ] {
            let dir = dir(&[(name, text)]);
            let err = FileTemplates::load(&dir).unwrap_err().to_string();
            assert!(err.contains(fragment), "{err}");
            std::fs::remove_dir_all(dir).unwrap();
        }
        assert!(
            FileTemplates::load(Path::new("/nonexistent/templates"))
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/templates")
        );
    }
}
