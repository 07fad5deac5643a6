//! The checked-in CRD YAML is exactly what the types generate.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// `kubectl apply` (client-side) stores the whole object in an annotation
/// limited to 256 KiB; stay far below it.
const LAST_APPLIED_LIMIT: usize = 256 * 1024;

#[test]
fn checked_in_crds_are_current() {
    for (file, crd) in verge_crds::all_crds() {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let generated = verge_crds::crd_yaml(&crd).expect("render");
        assert!(
            on_disk == generated,
            "{file} differs from the types; run `cargo run -p verge-crds --bin crdgen` and commit"
        );
        assert!(
            on_disk.len() * 2 < LAST_APPLIED_LIMIT,
            "{file} is {} bytes; client-side apply would exceed the annotation limit",
            on_disk.len()
        );
        // The YAML parses back into the same CRD.
        let parsed: CustomResourceDefinition = serde_saphyr::from_str(&on_disk).expect("parse");
        assert_eq!(parsed, crd);
    }
}

#[test]
fn crds_carry_status_printer_columns_and_short_names() {
    for (file, crd) in verge_crds::all_crds() {
        assert_eq!(crd.spec.group, "akri.sh");
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v0", "{file}");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{file} has no status subresource"
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        let short = crd.spec.names.short_names.clone().unwrap_or_default();
        match crd.spec.names.kind.as_str() {
            "Configuration" => {
                assert_eq!(short, ["akric"]);
                for c in ["Handler", "Capacity", "Instances", "Age"] {
                    assert!(columns.contains(&c), "missing column {c}");
                }
            }
            "Instance" => {
                assert_eq!(short, ["akrii"]);
                for c in ["Config", "Shared", "Nodes", "Used", "Age"] {
                    assert!(columns.contains(&c), "missing column {c}");
                }
            }
            other => panic!("unexpected kind {other}"),
        }
    }
}

/// Every property in the schemas has a description, so `kubectl explain` teaches the API.
#[test]
fn every_field_is_described() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let here = format!("{path}.{name}");
                let is_meta = matches!(here.as_str(), ".apiVersion" | ".kind" | ".metadata");
                if sub.get("description").is_none() && !is_meta {
                    missing.push(here.clone());
                }
                walk(&here, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    for (file, crd) in verge_crds::all_crds() {
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref()),
        )
        .expect("schema");
        let mut missing = Vec::new();
        walk("", &schema, &mut missing);
        assert!(
            missing.is_empty(),
            "{file}: undocumented fields {missing:?}"
        );
    }
}
