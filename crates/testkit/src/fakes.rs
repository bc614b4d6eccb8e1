//! Stateful in-memory fakes of the ports, for tests of everything that uses them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use batch_domain::config::CategorySelection;
use batch_domain::preference::Preference;
use batch_domain::{FeatureType, TenantId};
use batch_ports::{
    CategoryItem, CategoryRepository, ItemPage, PreferencePage, PreferenceSource, SourceError,
};

/// Categories held in memory. Filters are not interpreted (the store's contract suite covers
/// them); the limit and key paging are.
#[derive(Debug, Default)]
pub struct FakeCategories {
    items: Mutex<BTreeMap<(String, String), Vec<CategoryItem>>>,
    unavailable: AtomicBool,
    calls: AtomicUsize,
}

impl FakeCategories {
    /// Puts `items` (sorted by key) into category `name` of `tenant`.
    pub fn insert(&self, tenant: &str, name: &str, mut items: Vec<CategoryItem>) {
        items.sort_by(|a, b| a.key.cmp(&b.key));
        self.items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((tenant.to_owned(), name.to_owned()), items);
    }

    /// Makes every call fail as unavailable (or work again).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl CategoryRepository for FakeCategories {
    async fn items(
        &self,
        tenant: &TenantId,
        selection: &CategorySelection,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<ItemPage, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable(
                "fake categories are down".to_owned(),
            ));
        }
        let items = self
            .items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all = items
            .get(&(tenant.to_string(), selection.name.clone()))
            .ok_or_else(|| SourceError::NotFound(format!("category {}", selection.name)))?;
        let limit = selection
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let skipped = after.map_or(0, |a| {
            all.iter().take_while(|i| i.key.as_str() <= a).count()
        });
        let take = page_size.min(limit.saturating_sub(skipped));
        Ok(ItemPage {
            items: all.iter().skip(skipped).take(take).cloned().collect(),
            stale_since: None,
        })
    }
}

/// Preferences held in memory, with a change log for watermarks.
#[derive(Debug, Default)]
pub struct FakePreferences {
    log: Mutex<Vec<Preference>>,
    unavailable: AtomicBool,
    calls: AtomicUsize,
}

impl FakePreferences {
    /// Records `preference` as the latest change of its user.
    pub fn upsert(&self, preference: Preference) {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(preference);
    }

    /// Makes every call fail as unavailable (or work again).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.unavailable.load(Ordering::SeqCst) {
            Err(SourceError::Unavailable(
                "fake preferences are down".to_owned(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl PreferenceSource for FakePreferences {
    async fn list(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<PreferencePage, SourceError> {
        self.check()?;
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut latest: BTreeMap<String, Preference> = BTreeMap::new();
        for p in log
            .iter()
            .filter(|p| &p.tenant == tenant && &p.feature_type == feature)
        {
            latest.insert(p.user.to_string(), p.clone());
        }
        let preferences: Vec<Preference> = latest
            .into_iter()
            .filter(|(user, _)| page_token.is_none_or(|t| user.as_str() > t))
            .take(page_size)
            .map(|(_, p)| p)
            .collect();
        let next_page = (preferences.len() == page_size)
            .then(|| preferences.last().map(|p| p.user.to_string()))
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
        self.check()?;
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = usize::try_from(watermark)
            .unwrap_or(usize::MAX)
            .min(log.len());
        let changes = log[start..]
            .iter()
            .filter(|p| &p.tenant == tenant && &p.feature_type == feature)
            .cloned()
            .collect();
        Ok((changes, u64::try_from(log.len()).unwrap_or(u64::MAX)))
    }
}
