//! Schema helpers for fields whose OpenAPI shape is not derived from Rust types.

use schemars::{Schema, SchemaGenerator, json_schema};

/// An embedded Kubernetes object (PodSpec, JobSpec, ServiceSpec) kept as
/// `x-kubernetes-preserve-unknown-fields`, as Akri does. A full nested schema
/// would push the Configuration CRD past the 256 KiB last-applied annotation
/// limit of client-side `kubectl apply`; the controller validates these specs
/// with a server-side dry-run instead.
pub fn embedded_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Same as [`embedded_object`], for an optional field.
pub fn optional_embedded_object(generator: &mut SchemaGenerator) -> Schema {
    embedded_object(generator)
}

/// An RFC 3339 timestamp, as Kubernetes serialises `metav1.Time`.
pub fn date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "format": "date-time",
    })
}
