//! Fixtures for the unit tests: manifests from YAML text, inventory rows, observations
//! and a scripted fake driver that records what it was asked to do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use stead_schema::{Desired, Kind, Resource, ResourceId};

use crate::Drivers;
use crate::driver::{Driver, DriverError, FieldChange, Impact, Lookup, Observed, PruneAction};
use crate::state::InventoryEntry;

/// The desired set of a multi-document YAML text (loaded, not validated).
pub(crate) fn desired(yaml: &str) -> Desired {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(Path::new("m.yaml"), yaml, &mut resources, &mut errors);
    let desired = stead_schema::load::into_desired(resources, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    desired
}

/// One manifest document.
pub(crate) fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

/// A dir pool named `name`.
pub(crate) fn pool(name: &str) -> String {
    doc("StoragePool", name, "{type: dir, path: /p}")
}

/// A volume in pool `local`.
pub(crate) fn vol(name: &str, size: &str, policy: &str) -> String {
    doc(
        "Volume",
        name,
        &format!("{{pool: local, size: {size}, deletionPolicy: {policy}}}"),
    )
}

/// A bridge network with an MTU.
pub(crate) fn net(name: &str, mtu: u32) -> String {
    doc("Network", name, &format!("{{mtu: {mtu}}}"))
}

/// The id `Kind/name`.
pub(crate) fn id(kind: Kind, name: &str) -> ResourceId {
    ResourceId::new(kind, name)
}

/// The inventory holding `resources` as applied and recorded.
pub(crate) fn inventory(resources: &Desired) -> BTreeMap<ResourceId, InventoryEntry> {
    resources
        .resources
        .values()
        .map(|r| {
            let entry = InventoryEntry {
                spec_hash: r.spec_hash(),
                resource: r.clone(),
                applied_at: 0.0,
                recorded: true,
                adopted: false,
            };
            (r.id.clone(), entry)
        })
        .collect()
}

/// An owned object on the host showing `state`.
pub(crate) fn present(state: Value) -> Observed {
    Observed {
        exists: true,
        owned: true,
        state,
        ..Observed::absent()
    }
}

/// Every resource of `d` observed exactly as the fake driver projects it.
pub(crate) fn in_sync(d: &Desired) -> BTreeMap<ResourceId, Observed> {
    d.resources
        .values()
        .map(|r| (r.id.clone(), present(FakeDriver::project(r))))
        .collect()
}

/// What the fake drivers are told to do, shared by all kinds.
#[derive(Default)]
pub(crate) struct Script {
    /// Impact of a changed field path (default hot).
    pub impacts: BTreeMap<String, Impact>,
    /// Kinds whose delete destroys data (default recreate).
    pub data_loss_delete: BTreeSet<Kind>,
    /// Kinds that take safety snapshots.
    pub snapshots: BTreeSet<Kind>,
    /// Stop timeout of running objects, per kind (default: no graceful stop).
    pub stop_secs: BTreeMap<Kind, u64>,
    /// Names whose apply fails (retryable).
    pub fail: BTreeSet<String>,
    /// Names whose delete other objects on the host block (`delete_blockers`).
    pub blockers: BTreeMap<String, Vec<ResourceId>>,
    /// Names whose adoption the driver refuses, with why.
    pub adopt_refusals: BTreeMap<String, String>,
    /// What was done, in order: `apply Kind/name`, `delete Kind/name`.
    pub log: Mutex<Vec<String>>,
}

impl Script {
    /// What was done, in order.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// A driver whose desired state is the spec itself and whose host is [`Script::log`].
pub(crate) struct FakeDriver {
    kind: Kind,
    script: Arc<Script>,
}

impl FakeDriver {
    /// The observable shape of `r`: its spec without `deletionPolicy`.
    pub fn project(r: &Resource) -> Value {
        let mut v = r.spec_json();
        if let Some(m) = v.as_object_mut() {
            m.remove("deletionPolicy");
        }
        v
    }

    fn record(&self, what: &str, r: &Resource) {
        if let Ok(mut log) = self.script.log.lock() {
            log.push(format!("{what} {}", r.id));
        }
    }
}

/// One fake driver per kind the tests use, all following `script`.
pub(crate) fn drivers(script: &Arc<Script>) -> Drivers {
    let mut d: Drivers = BTreeMap::new();
    for kind in [Kind::StoragePool, Kind::Volume, Kind::Network] {
        let script = script.clone();
        d.insert(kind, Box::new(FakeDriver { kind, script }));
    }
    d
}

impl Driver for FakeDriver {
    fn kind(&self) -> Kind {
        self.kind
    }
    fn observe(
        &self,
        targets: &[&Resource],
        _w: &dyn Lookup,
    ) -> Result<BTreeMap<ResourceId, Observed>, DriverError> {
        Ok(targets
            .iter()
            .map(|r| (r.id.clone(), Observed::absent()))
            .collect())
    }
    fn desired_state(&self, r: &Resource, _w: &dyn Lookup) -> Value {
        Self::project(r)
    }
    fn impact(&self, path: &str) -> Impact {
        self.script
            .impacts
            .get(path)
            .copied()
            .unwrap_or(Impact::Hot)
    }
    fn check(&self, _d: &Resource, _o: &Observed, _c: &[FieldChange]) -> Result<(), String> {
        Ok(())
    }
    fn adopt_check(&self, r: &Resource, _o: &Observed, _w: &dyn Lookup) -> Result<(), String> {
        match self.script.adopt_refusals.get(r.id.name.as_str()) {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }
    fn release(&self, r: &Resource, _o: &Observed) -> Result<(), DriverError> {
        self.record("release", r);
        Ok(())
    }
    fn adopt(&self, r: &Resource, _o: &Observed, _w: &dyn Lookup) -> Result<(), DriverError> {
        self.record("adopt", r);
        Ok(())
    }
    fn apply(&self, r: &Resource, _o: &Observed, _w: &dyn Lookup) -> Result<(), DriverError> {
        if self.script.fail.contains(r.id.name.as_str()) {
            return Err(DriverError::Other("injected failure".into()));
        }
        self.record("apply", r);
        Ok(())
    }
    fn prune_action(&self, r: &Resource) -> PruneAction {
        if r.spec_json().get("deletionPolicy") == Some(&Value::from("Retain")) {
            PruneAction::Retain
        } else {
            PruneAction::Delete
        }
    }
    fn delete_impact(&self, _r: &Resource) -> Impact {
        if self.script.data_loss_delete.contains(&self.kind) {
            Impact::DataLoss
        } else {
            Impact::Recreate
        }
    }
    fn supports_safety_snapshot(&self, _r: &Resource, _w: &dyn Lookup) -> bool {
        self.script.snapshots.contains(&self.kind)
    }
    fn stop_timeout_secs(&self, _r: &Resource, _o: &Observed) -> Option<u64> {
        self.script.stop_secs.get(&self.kind).copied()
    }
    fn safety_snapshot(
        &self,
        r: &Resource,
        _w: &dyn Lookup,
        name: &str,
    ) -> Result<(), DriverError> {
        self.record(&format!("snapshot {name}"), r);
        Ok(())
    }
    fn delete_blockers(
        &self,
        r: &Resource,
        _o: &Observed,
        _w: &dyn Lookup,
    ) -> Result<Vec<ResourceId>, String> {
        Ok(self
            .script
            .blockers
            .get(r.id.name.as_str())
            .cloned()
            .unwrap_or_default())
    }
    fn delete(&self, r: &Resource, _o: &Observed, _w: &dyn Lookup) -> Result<(), DriverError> {
        self.record("delete", r);
        Ok(())
    }
}
