//! Starting and adopting migratekit processes: what the OMA sends to the watchdog.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/v1/jobs/{job_id}/start` on the watchdog: parameters only. The program
/// and its command line come from the VMA's own configuration (a template whose
/// placeholders these values fill), so the OMA can never make the VMA run arbitrary commands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartJobRequest {
    /// VMware inventory path of the VM (`{vm_path}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_path: Option<String>,
    /// NBD targets for multi-disk jobs (`{nbd_targets}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_targets: Option<String>,
    /// NBD export name for a single disk (`{nbd_export_name}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_export_name: Option<String>,
    /// Name of a vCenter credential set configured on the VMA (fills `{vmware_endpoint}`,
    /// `{vmware_username}`, `{vmware_password}`); never the password itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// Further named values for placeholders of the VMA's template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}

/// Body of `POST /api/v1/jobs/{job_id}/track` on the watchdog: adopt a running process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrackJobRequest {
    /// The process id; the watchdog checks its name and reads its start time itself.
    pub pid: u32,
}
