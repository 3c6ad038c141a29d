//! Starting and adopting migratekit processes: what the OMA sends to the watchdog.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, SchemaType, Type};

/// Longest value of one parameter of a start request, in characters.
pub const MAX_PARAMETER_CHARS: usize = 4096;

/// Names the request's free `parameters` may not set: they come from the job or the VMA.
pub const RESERVED_PARAMETERS: &[&str] = &[
    "job_id",
    "vm_path",
    "nbd_targets",
    "nbd_export_name",
    "vmware_endpoint",
    "vmware_username",
    "vmware_password",
];

/// True when `value` may fill a placeholder: at most [`MAX_PARAMETER_CHARS`] characters and
/// no control character (a newline would forge a log line, a NUL cut an argument).
pub fn is_parameter_value(value: &str) -> bool {
    value.chars().take(MAX_PARAMETER_CHARS + 1).count() <= MAX_PARAMETER_CHARS
        && !value.chars().any(char::is_control)
}

/// [`is_parameter_value`] as a pattern: no character of Unicode's Cc class, which is what
/// `char::is_control` tests.
const NO_CONTROL_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";

fn value_schema(nullable: bool) -> ObjectBuilder {
    let kind = if nullable {
        SchemaType::from_iter([Type::String, Type::Null])
    } else {
        SchemaType::new(Type::String)
    };
    ObjectBuilder::new()
        .schema_type(kind)
        .max_length(Some(MAX_PARAMETER_CHARS))
        .pattern(Some(NO_CONTROL_PATTERN))
}

fn optional_value_schema() -> ObjectBuilder {
    value_schema(true)
}

fn parameters_schema() -> ObjectBuilder {
    // "Not one of the reserved names", as a lookahead: `(?![\s\S])` is the end of the text
    // in every regex dialect (`$` also matches before a final newline in some).
    let reserved = format!("^(?!(?:{})(?![\\s\\S]))", RESERVED_PARAMETERS.join("|"));
    let names = Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(reserved))
            .build(),
    );
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::RefOr(
            value_schema(false).build().into(),
        )))
        .property_names(Some(names))
}

/// Body of `POST /api/v1/jobs/{job_id}/start` on the watchdog: parameters only. The program
/// and its command line come from the VMA's own configuration (a template whose
/// placeholders these values fill), so the OMA can never make the VMA run arbitrary commands.
/// Every value is at most [`MAX_PARAMETER_CHARS`] characters without control characters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartJobRequest {
    /// VMware inventory path of the VM (`{vm_path}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = optional_value_schema)]
    pub vm_path: Option<String>,
    /// NBD targets for multi-disk jobs (`{nbd_targets}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = optional_value_schema)]
    pub nbd_targets: Option<String>,
    /// NBD export name for a single disk (`{nbd_export_name}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = optional_value_schema)]
    pub nbd_export_name: Option<String>,
    /// Name of a vCenter credential set configured on the VMA (fills `{vmware_endpoint}`,
    /// `{vmware_username}`, `{vmware_password}`); never the password itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// Further named values for placeholders of the VMA's template; not the names of the
    /// fields above or of the credentials' values ([`RESERVED_PARAMETERS`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = parameters_schema)]
    pub parameters: BTreeMap<String, String>,
}

/// Body of `POST /api/v1/jobs/{job_id}/track` on the watchdog: adopt a running process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrackJobRequest {
    /// The process id; the watchdog checks its name and reads its start time itself.
    #[serde(deserialize_with = "crate::bounds::whole::deserialize")]
    #[schema(schema_with = crate::bounds::schema::pid)]
    pub pid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_value_is_counted_in_characters_and_has_no_control_character() {
        assert!(is_parameter_value(&"é".repeat(MAX_PARAMETER_CHARS)));
        assert!(!is_parameter_value(&"a".repeat(MAX_PARAMETER_CHARS + 1)));
        for bad in ["a\nb", "\u{0}", "\u{7f}", "\u{85}"] {
            assert!(!is_parameter_value(bad), "{bad:?}");
        }
        assert!(is_parameter_value("/Datacenter/vm/web 01"));
    }

    #[test]
    fn the_control_characters_of_the_pattern_are_rusts() {
        // The pattern excludes U+0000-U+001F and U+007F-U+009F: exactly `char::is_control`.
        assert!(NO_CONTROL_PATTERN.contains("\\u0000-\\u001f\\u007f-\\u009f"));
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let listed = matches!(u32::from(c), 0..=0x1f | 0x7f..=0x9f);
            assert_eq!(listed, c.is_control(), "{c:?}");
        }
    }
}
