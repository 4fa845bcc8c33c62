use super::*;
use serde_json::json;
use stead_reconciler::driver::{FieldChange, Impact};
use stead_reconciler::plan::{PlanInput, PlanOptions};

use crate::status::{Condition, ResourceStatus, Status};

/// A pool, a network, a volume, a container with a secret in its env and a VM.
pub(crate) fn desired() -> Desired {
    let yaml = r#"
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: local}
spec: {type: dir, path: /p}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: lan0}
spec: {mtu: 1500}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: disk}
spec: {pool: local, size: 1Mi}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: web, labels: {tier: front}}
spec:
  rootfs: {template: /t.tar}
  env: {DB_PASSWORD: hunter2, TZ: UTC}
  resources: {memory: 64Mi}
  interfaces: [{name: eth0, network: lan0, address: 10.42.0.10/24}]
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  cpus: 1
  memory: 16Mi
  boot: {kernel: /k}
  disks: [{volume: disk}]
  interfaces: [{network: lan0}]
"#;
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(
        std::path::Path::new("m.yaml"),
        yaml,
        &mut resources,
        &mut errors,
    );
    let d = stead_schema::load::into_desired(resources, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    d
}

pub(crate) fn rid(s: &str) -> ResourceId {
    s.parse().expect("id")
}

fn st(id: &str, word: &str, reason: &str, msg: &str) -> ResourceStatus {
    let id = rid(id);
    ResourceStatus {
        kind: id.kind.as_str().into(),
        name: id.name,
        status: word.into(),
        conditions: crate::status::conditions(None, word, reason, msg, 100.0),
    }
}

pub(crate) fn status() -> Status {
    Status {
        source: "git+file:///r.git".into(),
        revision: Some("a".repeat(40)),
        head_revision: Some("a".repeat(40)),
        last_result: Some("failed".into()),
        ready: true,
        drift_mode: "heal".into(),
        reconciles: 3,
        resources: vec![
            st("StoragePool/local", "Ready", "Converged", ""),
            st(
                "Network/lan0",
                "Ready",
                "Applied",
                "update in place at aaaa",
            ),
            st("Volume/disk", "Ready", "Converged", ""),
            st(
                "Container/web",
                "Failed",
                "ApplyFailed",
                "exec: DB_PASSWORD=hunter2 failed",
            ),
            st("VirtualMachine/vm1", "Progressing", "Progressing", ""),
        ],
        ..Status::default()
    }
}

/// An empty plan to fill in (a plan cannot be built outside the reconciler).
pub(crate) fn plan_with(changes: Vec<Change>) -> Plan {
    let desired = Desired::default();
    let none = BTreeMap::new();
    let input = PlanInput {
        desired: &desired,
        observed: &none,
        inventory: &BTreeMap::new(),
        pending: &BTreeSet::new(),
        observe_errors: &[],
        warnings: &[],
    };
    let mut p = stead_reconciler::plan::plan(&input, &BTreeMap::new(), &PlanOptions::default());
    p.changes = changes;
    p
}

pub(crate) fn change(id: &str, action: Action, fields: Vec<FieldChange>, drift: bool) -> Change {
    Change {
        id: rid(id),
        action,
        impact: fields.iter().map(|f| f.impact).max(),
        fields,
        drift,
        note: None,
        safety_snapshot: None,
        stop_timeout_secs: None,
    }
}

fn field(path: &str, old: Value, new: Value, impact: Impact) -> FieldChange {
    FieldChange {
        path: path.into(),
        old: Some(old),
        new: Some(new),
        impact,
    }
}

/// The container's memory and a secret env var change (not applied: it failed); the
/// bridge's MTU drifted and was repaired.
pub(crate) fn snapshot() -> Snapshot {
    let web = change(
        "Container/web",
        Action::Update,
        vec![
            field(
                "/resources/memory",
                json!(33554432),
                json!(67108864),
                Impact::Restart,
            ),
            field(
                "/env/DB_PASSWORD",
                json!("old-secret"),
                json!("hunter2"),
                Impact::Restart,
            ),
        ],
        false,
    );
    let lan = change(
        "Network/lan0",
        Action::Update,
        vec![field("/mtu", json!(1400), json!(1500), Impact::Hot)],
        true,
    );
    let mut observed = BTreeMap::new();
    observed.insert(
        rid("Container/web"),
        Observed {
            exists: true,
            owned: true,
            state: json!({"env": {"DB_PASSWORD": "old-secret"}, "resources": {"memory": 33554432}}),
            status: json!({"phase": "running", "restarts": 2, "cpuSeconds": 1.5, "memoryBytes": 1048576}),
            health: Health::Ready,
        },
    );
    let mut applied = BTreeMap::new();
    applied.insert(rid("Network/lan0"), Action::Update);
    let mut drift = BTreeMap::new();
    drift.insert(rid("Network/lan0"), "changed on the host: /mtu".to_string());
    Snapshot {
        revision: RevisionInfo::bare(&"a".repeat(40)),
        desired: Arc::new(desired()),
        observed,
        plan: plan_with(vec![lan, web]),
        applied,
        drift,
        drifted: BTreeSet::new(),
        proposed: None,
        branch: None,
    }
}

#[test]
fn the_tree_has_every_resource_with_its_level_status_and_edges() {
    let t = tree(&status(), Some(&snapshot()), &TreeFilter::default());
    assert_eq!(t.total, 5);
    let level = |id: &str| {
        t.nodes
            .iter()
            .find(|n| n.resource.id == id)
            .map(|n| n.level)
            .expect(id)
    };
    assert_eq!(level("StoragePool/local"), 0);
    assert_eq!(level("Network/lan0"), 0);
    assert_eq!(level("Volume/disk"), 1);
    assert_eq!(level("VirtualMachine/vm1"), 2);
    assert_eq!(level("Container/web"), 1);
    assert!(
        t.edges
            .iter()
            .any(|e| e.from == "VirtualMachine/vm1" && e.to == "Volume/disk")
    );
    assert!(
        t.edges
            .iter()
            .any(|e| e.from == "Container/web" && e.to == "Network/lan0")
    );
    let web = t
        .nodes
        .iter()
        .find(|n| n.resource.id == "Container/web")
        .expect("web");
    assert_eq!(web.resource.status, "Failed");
    assert_eq!(web.pending.as_deref(), Some("update in place"));
    let lan = t
        .nodes
        .iter()
        .find(|n| n.resource.id == "Network/lan0")
        .expect("lan");
    assert_eq!(
        lan.resource.drift.as_deref(),
        Some("changed on the host: /mtu")
    );
    assert!(!lan.resource.drifted, "repaired");
    assert_eq!(lan.pending, None, "applied");
    // Dependencies come first.
    assert_eq!(t.nodes[0].level, 0);
    assert_eq!(t.nodes.last().map(|n| n.level), Some(2));
}

#[test]
fn tree_filters_by_kind_status_and_name_and_keep_edges_between_shown_nodes() {
    let s = status();
    let snap = snapshot();
    let by = |kind: Option<&str>, status: Option<&str>, name: Option<&str>| {
        tree(
            &s,
            Some(&snap),
            &TreeFilter {
                kind: kind.map(Into::into),
                status: status.map(Into::into),
                name: name.map(Into::into),
            },
        )
    };
    let vms = by(Some("vm"), None, None);
    assert_eq!(vms.nodes.len(), 1);
    assert!(vms.edges.is_empty());
    assert_eq!(
        by(None, Some("failed"), None).nodes[0].resource.id,
        "Container/web"
    );
    assert_eq!(by(None, None, Some("LAN")).nodes.len(), 1);
    assert_eq!(by(Some("nope"), None, None).nodes.len(), 0);
}

#[test]
fn the_overview_counts_and_lists_failing_first() {
    let o = overview(&status(), Some(&snapshot()), OverviewExtras::default());
    assert_eq!(o.total, 5);
    assert_eq!(o.by_status.get("Ready"), Some(&3));
    assert_eq!(o.attention[0].id, "Container/web");
    assert_eq!(o.attention[1].id, "VirtualMachine/vm1");
    assert_eq!(o.sync.state, SyncState::OutOfSync);
    assert_eq!(o.pending_changes, 1);
    assert_eq!(o.counts[0].kind, "StoragePool", "kinds in dependency order");
    let busy = overview(
        &status(),
        None,
        OverviewExtras {
            busy: true,
            ..Default::default()
        },
    );
    assert_eq!(busy.sync.state, SyncState::Syncing);
    assert_eq!(busy.total, 5, "the status alone lists the resources");
}

#[test]
fn the_detail_shows_spec_observed_diff_and_workload_without_secrets() {
    let events = vec![];
    let d = detail(
        &status(),
        Some(&snapshot()),
        &rid("Container/web"),
        events,
        |_| Some("boot ok\n".into()),
    )
    .expect("detail");
    assert_eq!(d.pending.as_deref(), Some("update in place"));
    assert_eq!(d.diff.len(), 2);
    assert_eq!(d.diff[0].impact, "restart");
    assert_eq!(d.diff[0].text, "32Mi -> 64Mi");
    assert_eq!(d.depends_on, vec!["Network/lan0"]);
    let w = d.workload.clone().expect("workload");
    assert_eq!(w.addresses, vec!["10.42.0.10/24"]);
    assert_eq!(w.restarts, Some(2));
    assert_eq!(w.console_tail.as_deref(), Some("boot ok\n"));
    assert_eq!(d.labels.get("tier").map(String::as_str), Some("front"));
    let text = serde_json::to_string(&d).expect("json");
    for secret in ["hunter2", "old-secret"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert!(text.contains("DB_PASSWORD"), "names stay");
    assert!(
        detail(
            &status(),
            Some(&snapshot()),
            &rid("Volume/none"),
            vec![],
            |_| None
        )
        .is_none()
    );
}

#[test]
fn the_pending_plan_is_impact_labelled_and_redacted() {
    let p = pending(&status(), Some(&snapshot()));
    assert_eq!(
        p.changes.len(),
        1,
        "the applied drift repair is not pending"
    );
    assert_eq!(p.changes[0].id, "Container/web");
    assert_eq!(p.changes[0].state, "ApplyFailed");
    assert_eq!(p.max_impact.as_deref(), Some("restart"));
    assert!(
        p.text
            .contains("~ Container/web  (update in place, impact: restart)"),
        "{}",
        p.text
    );
    assert!(
        p.text.contains("resources.memory: 32Mi -> 64Mi"),
        "{}",
        p.text
    );
    let all = serde_json::to_string(&p).expect("json");
    assert!(
        !all.contains("hunter2") && !all.contains("old-secret"),
        "{all}"
    );
}

#[test]
fn a_proposed_head_is_the_pending_plan_in_manual_sync() {
    let mut snap = snapshot();
    let head = RevisionInfo::bare(&"b".repeat(40));
    snap.proposed = Some((
        head.clone(),
        plan_with(vec![change(
            "VirtualMachine/vm1",
            Action::Update,
            vec![field(
                "/memory",
                json!(16777216),
                json!(33554432),
                Impact::Restart,
            )],
            false,
        )]),
    ));
    let p = pending(&status(), Some(&snap));
    assert_eq!(p.target, Some(head));
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].state, "waiting-for-sync");
    assert_eq!(p.changes[0].impact.as_deref(), Some("restart"));
    let t = tree(&status(), Some(&snap), &TreeFilter::default());
    let vm = t
        .nodes
        .iter()
        .find(|n| n.resource.id == "VirtualMachine/vm1")
        .expect("vm");
    assert_eq!(vm.pending.as_deref(), Some("update in place"));
}

#[test]
fn live_updates_carry_only_changed_nodes() {
    let snap = snapshot();
    let before = node_statuses(&status(), Some(&snap));
    let mut s2 = status();
    s2.resources[3] = st("Container/web", "Ready", "Applied", "");
    let after = node_statuses(&s2, Some(&snap));
    let changed = changed_nodes(&before, &after);
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].id, "Container/web");
    assert_eq!(changed_nodes(&[], &after).len(), 5);
}

#[test]
fn condition_messages_are_redacted() {
    let c = Condition {
        type_: "Failed".into(),
        status: "True".into(),
        reason: "ApplyFailed".into(),
        message: "exec: DB_PASSWORD=hunter2".into(),
        last_transition_time: 1.0,
    };
    assert!(!ConditionView::from(&c).message.contains("hunter2"));
}

#[test]
fn a_tree_of_1000_resources_builds_quickly() {
    let mut yaml = String::from(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {name: local}\nspec: {type: dir, path: /p}\n---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: lan0}\nspec: {}\n",
    );
    for i in 0..499 {
        yaml.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: d{i}}}\nspec: {{pool: local, size: 1Mi}}\n---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm{i}}}\nspec: {{cpus: 1, memory: 16Mi, boot: {{kernel: /k}}, disks: [{{volume: d{i}}}], interfaces: [{{network: lan0}}]}}\n"
        ));
    }
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(
        std::path::Path::new("m.yaml"),
        &yaml,
        &mut resources,
        &mut errors,
    );
    let d = stead_schema::load::into_desired(resources, &mut errors);
    assert_eq!(d.len(), 1000);
    let status = Status {
        ready: true,
        resources: d
            .resources
            .keys()
            .map(|id| st(&id.to_string(), "Ready", "Converged", ""))
            .collect(),
        ..Status::default()
    };
    let snap = Snapshot {
        revision: RevisionInfo::bare("r"),
        desired: Arc::new(d),
        observed: BTreeMap::new(),
        plan: plan_with(vec![]),
        applied: BTreeMap::new(),
        drift: BTreeMap::new(),
        drifted: BTreeSet::new(),
        proposed: None,
        branch: None,
    };
    let t0 = std::time::Instant::now();
    let t = tree(&status, Some(&snap), &TreeFilter::default());
    let json = serde_json::to_string(&t).expect("json");
    let took = t0.elapsed();
    eprintln!(
        "tree of 1000 resources: {} ms, {} KiB of JSON",
        took.as_millis(),
        json.len() / 1024
    );
    assert_eq!(t.nodes.len(), 1000);
    assert_eq!(t.edges.len(), 499 * 3);
    assert_eq!(t.nodes.last().map(|n| n.level), Some(2));
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
}
