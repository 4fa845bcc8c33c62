//! A single host applies a manifest set written for a cluster: the HaGroup is skipped (it
//! is cluster configuration), `shared` and `replication` change nothing on the host.

use stead_e2e::Sandbox;

#[test]
fn a_single_host_ignores_cluster_configuration() {
    let sb = Sandbox::new();
    let text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\n\
         spec: {{type: dir, path: {}, shared: true}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: data}}\n\
         spec: {{pool: local, size: 1Mi, deletionPolicy: Delete}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: HaGroup\nmetadata: {{name: prod}}\n\
         spec: {{nodes: {{pve1: 2, pve2: 1}}, restricted: true}}\n",
        sb.path("pools/local").display()
    );
    sb.write("m/cluster.yaml", &text);
    let m = sb.path("m");
    let m = m.to_str().unwrap();

    sb.run(&["validate", m]).expect_code(0);
    let out = sb.run(&["diff", m]).expect_code(2);
    let plan = out.stdout();
    assert!(
        plan.contains("+ StoragePool/local") && plan.contains("+ Volume/data"),
        "{plan}"
    );
    assert!(!plan.contains("HaGroup"), "{plan}");
    sb.run(&["apply", "--yes", m]).expect_code(0);
    let out = sb.run(&["diff", m]).expect_code(0);
    assert!(out.stdout().contains("No changes"), "{}", out.stdout());
    let out = sb.run(&["get", "-o", "json"]).expect_code(0);
    assert!(!out.stdout().contains("HaGroup"), "{}", out.stdout());
    sb.run(&["destroy", "--yes", m]).expect_code(0);
}
