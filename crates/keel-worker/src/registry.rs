//! The code a worker can run: orchestrations by name and version, activities by name.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use keel_replay::Orchestration;

use crate::activity::Activity;
use crate::error::{Error, Result};

/// Orchestrations and activities by name. Built once, before the worker starts, and
/// shared read-only: there is no global registry.
#[derive(Default, Clone)]
pub struct Registry {
    orchestrations: BTreeMap<String, BTreeMap<u32, Arc<dyn Orchestration>>>,
    activities: BTreeMap<String, Arc<dyn Activity>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("orchestrations", &self.orchestration_names())
            .field("activities", &self.activity_names())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `orchestration` as version `version` of `name`. Instances started
    /// without a version run the newest; a running instance keeps the version it
    /// started with. Registering the same name and version twice is an error.
    pub fn add_orchestration(
        &mut self,
        name: impl Into<String>,
        version: u32,
        orchestration: Arc<dyn Orchestration>,
    ) -> Result<()> {
        let name = name.into();
        let versions = self.orchestrations.entry(name.clone()).or_default();
        if versions.contains_key(&version) {
            return Err(Error::Duplicate {
                what: "orchestration",
                name: format!("{name} v{version}"),
            });
        }
        versions.insert(version, orchestration);
        Ok(())
    }

    /// Registers `activity` as `name`. Registering a name twice is an error.
    pub fn add_activity(
        &mut self,
        name: impl Into<String>,
        activity: Arc<dyn Activity>,
    ) -> Result<()> {
        let name = name.into();
        if self.activities.contains_key(&name) {
            return Err(Error::Duplicate {
                what: "activity",
                name,
            });
        }
        self.activities.insert(name, activity);
        Ok(())
    }

    /// Version `version` of orchestration `name` (the newest when none), with the
    /// version it resolved to.
    pub fn orchestration(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<(u32, Arc<dyn Orchestration>)> {
        let found = self
            .orchestrations
            .get(name)
            .and_then(|versions| match version {
                Some(version) => versions.get_key_value(&version),
                None => versions.last_key_value(),
            });
        found
            .map(|(version, code)| (*version, Arc::clone(code)))
            .ok_or_else(|| Error::Unregistered {
                what: "orchestration",
                name: match version {
                    Some(version) => format!("{name} v{version}"),
                    None => name.to_owned(),
                },
                registered: self.orchestration_names(),
            })
    }

    /// Activity `name`.
    pub fn activity(&self, name: &str) -> Result<Arc<dyn Activity>> {
        self.activities
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Unregistered {
                what: "activity",
                name: name.to_owned(),
                registered: self.activity_names(),
            })
    }

    /// Whether orchestration `name` has any version registered.
    pub fn has_orchestration(&self, name: &str) -> bool {
        self.orchestrations.contains_key(name)
    }

    /// Every registered orchestration as `name v1, v2`, sorted.
    pub fn orchestration_names(&self) -> Vec<String> {
        self.orchestrations
            .iter()
            .map(|(name, versions)| {
                let versions: Vec<String> = versions.keys().map(|v| format!("v{v}")).collect();
                format!("{name} {}", versions.join(", "))
            })
            .collect()
    }

    /// Every registered activity name, sorted.
    pub fn activity_names(&self) -> Vec<String> {
        self.activities.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{Failure, Payload};
    use keel_replay::OrchestrationContext;

    use super::*;
    use crate::activity::ActivityContext;

    fn orchestration() -> Arc<dyn Orchestration> {
        Arc::new(
            |_ctx: OrchestrationContext, input: Payload| async move { Ok::<_, Failure>(input) },
        )
    }

    fn activity() -> Arc<dyn Activity> {
        Arc::new(|_ctx: ActivityContext, input: Payload| async move { Ok::<_, Failure>(input) })
    }

    #[test]
    fn the_newest_version_runs_unless_one_is_named() {
        let mut registry = Registry::new();
        registry
            .add_orchestration("order", 1, orchestration())
            .unwrap();
        registry
            .add_orchestration("order", 3, orchestration())
            .unwrap();
        assert_eq!(registry.orchestration("order", None).unwrap().0, 3);
        assert_eq!(registry.orchestration("order", Some(1)).unwrap().0, 1);
        let missing = registry
            .orchestration("order", Some(2))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("order v2"), "{missing}");
        assert!(missing.contains("order v1, v3"), "{missing}");
    }

    #[test]
    fn unknown_names_list_what_is_registered() {
        let mut registry = Registry::new();
        registry.add_activity("charge", activity()).unwrap();
        registry.add_activity("ship", activity()).unwrap();
        let message = registry.activity("refund").err().unwrap().to_string();
        assert!(message.contains("\"refund\""), "{message}");
        assert!(message.contains("charge, ship"), "{message}");
    }

    #[test]
    fn a_name_registers_once() {
        let mut registry = Registry::new();
        registry.add_activity("charge", activity()).unwrap();
        assert!(registry.add_activity("charge", activity()).is_err());
        registry
            .add_orchestration("order", 1, orchestration())
            .unwrap();
        assert!(
            registry
                .add_orchestration("order", 1, orchestration())
                .is_err()
        );
    }
}
