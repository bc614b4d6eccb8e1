//! Preparing a run: which items it has, which users are valid, and what each request carries.
//!
//! The strategy follows from the job's batch type ([`batch_domain::Strategy`]): Individual (one
//! item per user or category item), Object (one item for a whole user set or category),
//! Combined (one item over several categories, data keyed by category), and Preference, which
//! prepares like the strategy beneath it and then applies each user's preferences. An embedding
//! service can register its own [`BatchStrategy`] under a name and point jobs at it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use batch_domain::batch_type::Execution;
use batch_domain::config::{CategorySelection, Job, Source, UserSelection};
use batch_domain::context::Tally;
use batch_domain::preference::{Preference, PreferenceDefaults};
use batch_domain::run::ItemStatus;
use batch_domain::{Priority, TemplateId, TenantId, UserId};
use batch_ports::runs::NewItem;
use batch_ports::{CategoryItem, SourceError};
use serde_json::{Map, Value, json};

use crate::{Error, Ports};

/// What one run covers and overrides: part of a job's users (the users of one preference
/// group, say), and a trigger's template, parameter and priority overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scope {
    /// Only these users (all of the job's users when `None`).
    pub users: Option<HashSet<UserId>>,
    /// A template to use instead of the job's and the users' own (a trigger override).
    pub template: Option<TemplateId>,
    /// Parameters merged over every item's (a trigger override).
    pub parameters: Map<String, Value>,
    /// A priority to run with instead of the job's.
    pub priority: Option<Priority>,
}

impl Scope {
    /// Whether `user` belongs to the run.
    pub fn includes(&self, user: &UserId) -> bool {
        self.users.as_ref().is_none_or(|users| users.contains(user))
    }

    /// Applies the template and parameter overrides to prepared items: they win over the
    /// job's template and over users' preference overrides.
    pub fn apply_overrides(&self, items: &mut [NewItem]) {
        if self.template.is_none() && self.parameters.is_empty() {
            return;
        }
        for item in items {
            let Value::Object(payload) = &mut item.payload else {
                continue;
            };
            if let Some(template) = &self.template {
                payload.insert("template".to_owned(), Value::from(template.as_str()));
            }
            if !self.parameters.is_empty() {
                let parameters = payload
                    .entry("parameters")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !parameters.is_object() {
                    *parameters = Value::Object(Map::new());
                }
                if let Value::Object(own) = parameters {
                    own.extend(self.parameters.clone());
                }
            }
        }
    }
}

/// How large the pages and validation chunks of preparation are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareSettings {
    /// User ids per validation query.
    pub validation_chunk: usize,
    /// Items or users per page read from a source.
    pub page_size: usize,
}

impl Default for PrepareSettings {
    fn default() -> Self {
        PrepareSettings {
            validation_chunk: 1_000,
            page_size: 1_000,
        }
    }
}

/// What preparing a run found besides its items (which went to the [`ItemSink`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prepared {
    /// Validation of the job's users.
    pub validation: Tally,
    /// For category sources: validation of the users the items refer to.
    pub user_references: Option<Tally>,
    /// How preparation went where it did not go as configured (fallbacks, stale data).
    pub notes: Vec<String>,
}

/// Where a strategy puts the items it prepares, a page at a time: the run's draft in the
/// store, so that a run of any size is prepared without its items ever being held at once.
#[async_trait]
pub trait ItemSink: Send {
    /// Adds `items` to the run, after those added before.
    ///
    /// # Errors
    /// [`Error::Store`] when the store refuses them (a duplicate key, say) or fails.
    async fn add(&mut self, items: Vec<NewItem>) -> Result<(), Error>;
}

/// Collects the items in memory: for tests, and for strategies that look at all of another
/// strategy's items before passing them on.
#[async_trait]
impl ItemSink for Vec<NewItem> {
    async fn add(&mut self, items: Vec<NewItem>) -> Result<(), Error> {
        self.extend(items);
        Ok(())
    }
}

/// Prepares the items of a run for one kind of job.
#[async_trait]
pub trait BatchStrategy: Send + Sync {
    /// Puts the items of a run of `job` within `scope` into `items`, a page at a time, and
    /// says what validation found.
    ///
    /// # Errors
    /// [`Error::Source`] when a source cannot be read; [`Error::Job`] when the job does not
    /// fit the strategy; [`Error::Store`] when `items` refuses a page.
    async fn prepare(
        &self,
        job: &Job,
        scope: &Scope,
        ports: &Ports,
        settings: &PrepareSettings,
        items: &mut dyn ItemSink,
    ) -> Result<Prepared, Error>;
}

/// The registered strategies, by name.
#[derive(Clone)]
pub struct Strategies {
    by_name: HashMap<String, Arc<dyn BatchStrategy>>,
}

impl Default for Strategies {
    fn default() -> Self {
        let mut strategies = Strategies {
            by_name: HashMap::new(),
        };
        strategies.register("individual", Arc::new(Builtin(Execution::Individual)));
        strategies.register("object", Arc::new(Builtin(Execution::Object)));
        strategies.register("combined", Arc::new(Builtin(Execution::Combined)));
        strategies.register("preference", Arc::new(PreferenceStrategy));
        strategies
    }
}

impl Strategies {
    /// Registers (or replaces) the strategy called `name`.
    pub fn register(&mut self, name: &str, strategy: Arc<dyn BatchStrategy>) {
        self.by_name.insert(name.to_owned(), strategy);
    }

    /// The strategy for `job`: the one named after its batch type's strategy.
    ///
    /// # Errors
    /// [`Error::Job`] when no strategy of that name is registered.
    pub fn for_job(&self, job: &Job) -> Result<Arc<dyn BatchStrategy>, Error> {
        let name = job.strategy().name();
        self.by_name.get(name).cloned().ok_or_else(|| {
            Error::Job(format!(
                "no strategy {name:?} is registered for job {}",
                job.id
            ))
        })
    }
}

/// Individual, Object and Combined.
struct Builtin(Execution);

#[async_trait]
impl BatchStrategy for Builtin {
    async fn prepare(
        &self,
        job: &Job,
        scope: &Scope,
        ports: &Ports,
        settings: &PrepareSettings,
        items: &mut dyn ItemSink,
    ) -> Result<Prepared, Error> {
        prepare_base(self.0, job, scope, ports, settings, items).await
    }
}

async fn prepare_base(
    execution: Execution,
    job: &Job,
    scope: &Scope,
    ports: &Ports,
    settings: &PrepareSettings,
    items: &mut dyn ItemSink,
) -> Result<Prepared, Error> {
    match &job.source {
        Source::Users(selection) => {
            let mut pages = UserPages {
                tenant: &job.tenant,
                selection,
                scope,
                ports,
                settings,
                taken: 0,
                after: None,
                done: false,
            };
            let mut validation = Tally::default();
            // Object and Combined send the whole user set in one item.
            let mut set = Vec::new();
            while let Some((valid, invalid)) = pages.next().await? {
                validation.total += count(valid.len() + invalid.len());
                validation.valid += count(valid.len());
                validation.invalid += count(invalid.len());
                let mut page: Vec<NewItem> = invalid
                    .into_iter()
                    .map(|user| NewItem {
                        key: user.to_string(),
                        payload: json!({ "user_id": user.as_str(), "reason": "not an active user of the tenant" }),
                        user: Some(user),
                        status: ItemStatus::Invalid,
                    })
                    .collect();
                match execution {
                    Execution::Individual => page.extend(valid.into_iter().map(|user| NewItem {
                        key: user.to_string(),
                        payload: json!({ "user_id": user.as_str() }),
                        user: Some(user),
                        status: ItemStatus::Pending,
                    })),
                    Execution::Object | Execution::Combined => set.extend(valid),
                }
                if !page.is_empty() {
                    items.add(page).await?;
                }
            }
            if !set.is_empty() {
                items
                    .add(vec![NewItem {
                        key: "users".to_owned(),
                        user: None,
                        status: ItemStatus::Pending,
                        payload: json!({ "users": set.iter().map(UserId::as_str).collect::<Vec<_>>() }),
                    }])
                    .await?;
            }
            Ok(Prepared {
                validation,
                ..Prepared::default()
            })
        }
        Source::Category(selection) => {
            let category = category_items(&job.tenant, selection, ports, settings).await?;
            categories_prepared(
                execution,
                job,
                vec![(selection.name.clone(), category)],
                scope,
                ports,
                settings,
                items,
            )
            .await
        }
        Source::Categories(selections) => {
            let mut all = Vec::with_capacity(selections.len());
            for selection in selections {
                all.push((
                    selection.name.clone(),
                    category_items(&job.tenant, selection, ports, settings).await?,
                ));
            }
            categories_prepared(execution, job, all, scope, ports, settings, items).await
        }
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The job's users a page at a time, split into valid and invalid and restricted to a scope:
/// listed ids are validated in chunks, a filter is read in pages.
struct UserPages<'a> {
    tenant: &'a TenantId,
    selection: &'a UserSelection,
    scope: &'a Scope,
    ports: &'a Ports,
    settings: &'a PrepareSettings,
    /// Listed ids: how many were looked at. Filter: how many users in scope were taken.
    taken: usize,
    /// Filter: the last user read.
    after: Option<UserId>,
    done: bool,
}

impl UserPages<'_> {
    /// The next page as (valid, invalid) users; `None` after the last.
    async fn next(&mut self) -> Result<Option<(Vec<UserId>, Vec<UserId>)>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.selection {
            UserSelection::Ids(ids) => {
                let chunk = self.settings.validation_chunk.max(1);
                let mut page = Vec::with_capacity(chunk.min(ids.len()));
                while page.len() < chunk
                    && let Some(id) = ids.get(self.taken)
                {
                    self.taken += 1;
                    if self.scope.includes(id) {
                        page.push(id.clone());
                    }
                }
                if page.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                let result = self.ports.users.validate_users(self.tenant, &page).await?;
                Ok(Some((result.valid, result.invalid)))
            }
            UserSelection::Filter { filters, limit } => {
                let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
                if self.taken >= limit {
                    self.done = true;
                    return Ok(None);
                }
                let page_size = self.settings.page_size.max(1).min(limit - self.taken);
                let page = self
                    .ports
                    .users
                    .find_users(self.tenant, filters, self.after.as_ref(), page_size)
                    .await?;
                let Some(last) = page.last().cloned() else {
                    self.done = true;
                    return Ok(None);
                };
                self.done = page.len() < page_size;
                self.after = Some(last);
                let users: Vec<UserId> = page
                    .into_iter()
                    .filter(|u| self.scope.includes(u))
                    .collect();
                self.taken += users.len();
                Ok(Some((users, Vec::new())))
            }
        }
    }
}

/// Every item of one category selection, page by page.
async fn category_items(
    tenant: &TenantId,
    selection: &CategorySelection,
    ports: &Ports,
    settings: &PrepareSettings,
) -> Result<Vec<CategoryItem>, Error> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = ports
            .categories
            .items(
                tenant,
                selection,
                after.as_deref(),
                settings.page_size.max(1),
            )
            .await?;
        let Some(last) = page.items.last() else { break };
        after = Some(last.key.clone());
        let full = page.items.len() == settings.page_size.max(1);
        items.extend(page.items);
        if !full {
            break;
        }
    }
    Ok(items)
}

/// Category items as run items, with the users they refer to validated.
async fn categories_prepared(
    execution: Execution,
    job: &Job,
    categories: Vec<(String, Vec<CategoryItem>)>,
    scope: &Scope,
    ports: &Ports,
    settings: &PrepareSettings,
    items: &mut dyn ItemSink,
) -> Result<Prepared, Error> {
    // Validate every distinct reference once, in chunks.
    let mut refs: Vec<String> = categories
        .iter()
        .flat_map(|(_, items)| items.iter().flat_map(|i| i.user_refs.iter().cloned()))
        .collect();
    refs.sort();
    refs.dedup();
    let mut parsed = Vec::with_capacity(refs.len());
    let mut malformed = 0u64;
    for r in &refs {
        match UserId::parse(r.as_str()) {
            Ok(id) => parsed.push(id),
            Err(_) => malformed += 1,
        }
    }
    let mut valid_refs: HashSet<UserId> = HashSet::with_capacity(parsed.len());
    for chunk in parsed.chunks(settings.validation_chunk.max(1)) {
        valid_refs.extend(ports.users.validate_users(&job.tenant, chunk).await?.valid);
    }
    let user_references = Tally {
        total: count(refs.len()),
        valid: count(valid_refs.len()),
        invalid: count(parsed.len() - valid_refs.len()) + malformed,
    };
    let in_scope = |user: &UserId| scope.includes(user);
    let entry = |item: &CategoryItem| {
        let users: Vec<String> = item
            .user_refs
            .iter()
            .filter_map(|r| UserId::parse(r.as_str()).ok())
            .filter(|u| valid_refs.contains(u) && in_scope(u))
            .map(|u| u.to_string())
            .collect();
        json!({ "key": item.key, "attributes": item.attributes, "users": users })
    };
    let total_items: usize = categories.iter().map(|(_, items)| items.len()).sum();
    let prepared = Prepared {
        validation: Tally {
            total: count(total_items),
            valid: count(total_items),
            invalid: 0,
        },
        user_references: Some(user_references),
        ..Prepared::default()
    };
    // The categories are in memory already (their references are validated together), so
    // their items are built at once and handed on in pages.
    let mut out = Vec::new();
    match execution {
        Execution::Individual => {
            let several = categories.len() > 1;
            for (name, items) in &categories {
                for item in items {
                    let mut payload = entry(item);
                    payload["category"] = json!(name);
                    out.push(NewItem {
                        key: if several {
                            format!("{name}/{}", item.key)
                        } else {
                            item.key.clone()
                        },
                        user: None,
                        status: ItemStatus::Pending,
                        payload,
                    });
                }
            }
        }
        Execution::Object => {
            for (name, items) in &categories {
                out.push(NewItem {
                    key: name.clone(),
                    user: None,
                    status: ItemStatus::Pending,
                    payload: json!({ "category": name, "items": items.iter().map(entry).collect::<Vec<_>>() }),
                });
            }
        }
        Execution::Combined => {
            let by_category: BTreeMap<&str, Vec<Value>> = categories
                .iter()
                .map(|(name, items)| (name.as_str(), items.iter().map(entry).collect()))
                .collect();
            out.push(NewItem {
                key: "combined".to_owned(),
                user: None,
                status: ItemStatus::Pending,
                payload: json!({ "categories": by_category }),
            });
        }
    }
    let page_size = settings.page_size.max(1);
    let mut out = out.into_iter();
    loop {
        let page: Vec<NewItem> = out.by_ref().take(page_size).collect();
        if page.is_empty() {
            break;
        }
        items.add(page).await?;
    }
    Ok(prepared)
}

/// Dynamic jobs: prepare like the strategy beneath, then apply each user's preferences —
/// disabled users drop out, template overrides and parameters travel with each request.
struct PreferenceStrategy;

/// The enabled preferences of the job's feature, or `None` when the source is unavailable.
async fn load_preferences(
    job: &Job,
    ports: &Ports,
    settings: &PrepareSettings,
) -> Result<(Option<HashMap<UserId, Preference>>, Vec<String>), Error> {
    let Some(dynamic) = &job.dynamic else {
        return Ok((Some(HashMap::new()), Vec::new()));
    };
    let mut notes = Vec::new();
    let mut by_user = HashMap::new();
    let mut token: Option<String> = None;
    loop {
        match ports
            .preferences
            .list(
                &job.tenant,
                &dynamic.feature_type,
                token.as_deref(),
                settings.page_size.max(1),
            )
            .await
        {
            Ok(page) => {
                if let Some(since) = page.stale_since {
                    let note = format!("preferences served from cache, stale since {since}");
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                }
                by_user.extend(page.preferences.into_iter().map(|p| (p.user.clone(), p)));
                match page.next_page {
                    Some(next) => token = Some(next),
                    None => break,
                }
            }
            Err(SourceError::Unavailable(why)) => {
                notes.push(format!(
                    "preferences unavailable ({why}); the job's default preferences were applied to every user"
                ));
                return Ok((None, notes));
            }
            Err(other) => return Err(other.into()),
        }
    }
    Ok((Some(by_user), notes))
}

/// The request overrides of one user: template and parameters.
fn overrides(
    user: &UserId,
    preferences: Option<&HashMap<UserId, Preference>>,
    defaults: &PreferenceDefaults,
) -> Option<Value> {
    let preference = preferences.and_then(|p| p.get(user));
    if preference.is_some_and(|p| !p.enabled) {
        return None;
    }
    let mut parameters: Map<String, Value> = defaults.parameters.clone();
    if let Some(p) = preference {
        parameters.extend(p.parameters.clone());
    }
    let template = preference
        .and_then(|p| p.template_override.clone())
        .or_else(|| defaults.template.clone());
    Some(json!({
        "template": template.map(|t| t.to_string()),
        "parameters": parameters,
    }))
}

#[async_trait]
impl BatchStrategy for PreferenceStrategy {
    async fn prepare(
        &self,
        job: &Job,
        scope: &Scope,
        ports: &Ports,
        settings: &PrepareSettings,
        items: &mut dyn ItemSink,
    ) -> Result<Prepared, Error> {
        let execution = job.strategy().execution;
        let (preferences, notes) = load_preferences(job, ports, settings).await?;
        let defaults = job
            .dynamic
            .as_ref()
            .map(|d| d.defaults.clone())
            .unwrap_or_default();
        let mut with_preferences = WithPreferences {
            items,
            preferences: preferences.as_ref(),
            defaults: &defaults,
            disabled: 0,
        };
        let mut prepared = prepare_base(
            execution,
            job,
            scope,
            ports,
            settings,
            &mut with_preferences,
        )
        .await?;
        prepared.notes.extend(notes);
        if with_preferences.disabled > 0 {
            prepared.notes.push(format!(
                "{} users skipped: their preference is disabled",
                with_preferences.disabled
            ));
        }
        Ok(prepared)
    }
}

/// Applies each user's preference to the items passing through: a disabled user's item drops
/// out, template overrides and parameters travel with each request.
struct WithPreferences<'a> {
    items: &'a mut dyn ItemSink,
    preferences: Option<&'a HashMap<UserId, Preference>>,
    defaults: &'a PreferenceDefaults,
    /// Items dropped because their user's preference is disabled.
    disabled: usize,
}

#[async_trait]
impl ItemSink for WithPreferences<'_> {
    async fn add(&mut self, page: Vec<NewItem>) -> Result<(), Error> {
        let mut kept = Vec::with_capacity(page.len());
        for mut item in page {
            if item.status != ItemStatus::Pending {
                kept.push(item);
                continue;
            }
            if let Some(user) = &item.user {
                match overrides(user, self.preferences, self.defaults) {
                    Some(o) => {
                        item.payload["template"] = o["template"].clone();
                        item.payload["parameters"] = o["parameters"].clone();
                        kept.push(item);
                    }
                    None => self.disabled += 1,
                }
                continue;
            }
            // Set-level items carry a preference per user and drop disabled users.
            let mut per_user = Map::new();
            apply_to_user_lists(&mut item.payload, &mut |user: &str| {
                let Ok(id) = UserId::parse(user) else {
                    return false;
                };
                match overrides(&id, self.preferences, self.defaults) {
                    Some(o) => {
                        per_user.insert(user.to_owned(), o);
                        true
                    }
                    None => false,
                }
            });
            item.payload["preferences"] = Value::Object(per_user);
            kept.push(item);
        }
        if kept.is_empty() {
            return Ok(());
        }
        self.items.add(kept).await
    }
}

/// Keeps, in every `"users"` list inside `value`, the users for which `keep` says yes.
fn apply_to_user_lists(value: &mut Value, keep: &mut dyn FnMut(&str) -> bool) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if key == "users"
                    && let Value::Array(users) = inner
                {
                    users.retain(|u| u.as_str().is_some_and(&mut *keep));
                } else {
                    apply_to_user_lists(inner, keep);
                }
            }
        }
        Value::Array(values) => {
            for inner in values {
                apply_to_user_lists(inner, keep);
            }
        }
        _ => {}
    }
}
