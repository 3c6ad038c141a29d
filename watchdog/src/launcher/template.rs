//! Filling the command template: `{name}` placeholders replaced by parameter values, each
//! argument remembering whether a secret went into it so that logs can redact it.

use std::collections::BTreeMap;

use api::StartJobRequest;
use api::launch::{RESERVED_PARAMETERS as RESERVED, is_parameter_value};

use super::LauncherConfig;

/// One argument of the rendered command line.
#[derive(Clone, PartialEq, Eq)]
pub struct RenderedArg {
    /// The value passed to the program.
    pub value: String,
    /// Whether a secret (the vCenter password) went into it.
    pub secret: bool,
}

impl std::fmt::Debug for RenderedArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secret {
            f.write_str("\"<redacted>\"")
        } else {
            write!(f, "{:?}", self.value)
        }
    }
}

/// Why a template could not be filled. Messages name the parameter, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template uses a placeholder the request did not provide.
    #[error(
        "the VMA's migratekit command template needs parameter `{0}`, which the request did not provide"
    )]
    Missing(String),
    /// The request named credentials the VMA does not have.
    #[error(
        "no vCenter credentials named `{0}` are configured on this VMA; add them to its configuration or send another name"
    )]
    UnknownCredentials(String),
    /// A value is too long or contains control characters.
    #[error(
        "parameter `{0}` is invalid: values must be at most 4096 characters without control characters"
    )]
    InvalidValue(String),
    /// The request's `parameters` tried to set a reserved name.
    #[error(
        "parameter `{0}` cannot be set through `parameters`; use the request's own field or the VMA's configuration"
    )]
    Reserved(String),
    /// A `{` without its `}` in the configured template.
    #[error(
        "the VMA's migratekit command template has an unclosed `{{` in argument {0}; fix the configuration"
    )]
    Unclosed(usize),
}

/// Fills `config.args` for `job_id` and `request`.
pub fn render(
    config: &LauncherConfig,
    job_id: &str,
    request: &StartJobRequest,
) -> Result<Vec<RenderedArg>, TemplateError> {
    let mut values: BTreeMap<&str, (&str, bool)> = BTreeMap::new();
    for (name, value) in &request.parameters {
        if RESERVED.contains(&name.as_str()) {
            return Err(TemplateError::Reserved(name.clone()));
        }
        values.insert(name, (value, false));
    }
    values.insert("job_id", (job_id, false));
    let optional = [
        ("vm_path", &request.vm_path),
        ("nbd_targets", &request.nbd_targets),
        ("nbd_export_name", &request.nbd_export_name),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            values.insert(name, (value, false));
        }
    }
    if let Some(name) = &request.credentials {
        let creds = config
            .credentials
            .get(name)
            .ok_or_else(|| TemplateError::UnknownCredentials(name.clone()))?;
        values.insert("vmware_endpoint", (&creds.endpoint, false));
        values.insert("vmware_username", (&creds.username, false));
        values.insert("vmware_password", (creds.password.expose(), true));
    }
    for (name, (value, _)) in &values {
        if !is_parameter_value(value) {
            return Err(TemplateError::InvalidValue((*name).to_owned()));
        }
    }
    config
        .args
        .iter()
        .enumerate()
        .map(|(index, arg)| render_one(index, arg, &values))
        .collect()
}

fn render_one(
    index: usize,
    template: &str,
    values: &BTreeMap<&str, (&str, bool)>,
) -> Result<RenderedArg, TemplateError> {
    let mut out = String::new();
    let mut secret = false;
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or(TemplateError::Unclosed(index))?;
        let name = &after[..close];
        let (value, is_secret) = values
            .get(name)
            .ok_or_else(|| TemplateError::Missing(name.to_owned()))?;
        out.push_str(value);
        secret |= is_secret;
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(RenderedArg { value: out, secret })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::VmwareCredentials;
    use crate::secret::Secret;

    fn config() -> LauncherConfig {
        let mut config = LauncherConfig::new("/usr/bin/migratekit");
        config.args = [
            "migrate",
            "--vmware-endpoint",
            "{vmware_endpoint}",
            "--vmware-password",
            "{vmware_password}",
            "--vmware-path",
            "{vm_path}",
            "--job-id={job_id}",
        ]
        .map(String::from)
        .to_vec();
        config.credentials.insert(
            "vc1".into(),
            VmwareCredentials {
                endpoint: "vc.example".into(),
                username: "admin".into(),
                password: Secret::new("s3cret-pw"),
            },
        );
        config
    }

    #[test]
    fn fills_placeholders_and_redacts_the_password_in_debug() {
        let request = StartJobRequest {
            vm_path: Some("/dc/vm/web 1".into()),
            credentials: Some("vc1".into()),
            ..Default::default()
        };
        let args = render(&config(), "job-7", &request).unwrap();
        let values: Vec<&str> = args.iter().map(|a| a.value.as_str()).collect();
        assert_eq!(values[4], "s3cret-pw");
        assert_eq!(values[6], "/dc/vm/web 1");
        assert_eq!(values[7], "--job-id=job-7");
        let shown = format!("{args:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn refuses_missing_reserved_unknown_and_bad_values_without_echoing_them() {
        let missing = render(&config(), "j", &StartJobRequest::default()).unwrap_err();
        assert_eq!(missing, TemplateError::Missing("vmware_endpoint".into()));
        let mut request = StartJobRequest {
            credentials: Some("nope".into()),
            ..Default::default()
        };
        assert!(matches!(
            render(&config(), "j", &request),
            Err(TemplateError::UnknownCredentials(_))
        ));
        request.credentials = Some("vc1".into());
        request.vm_path = Some("a\nb".into());
        assert_eq!(
            render(&config(), "j", &request),
            Err(TemplateError::InvalidValue("vm_path".into()))
        );
        request.vm_path = None;
        request
            .parameters
            .insert("vmware_password".into(), "x".into());
        assert_eq!(
            render(&config(), "j", &request),
            Err(TemplateError::Reserved("vmware_password".into()))
        );
    }
}
