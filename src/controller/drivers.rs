//! What the controller asks of clusters' drivers once per pass: each
//! watched cluster's driver's agent, once (`DriverStatus`: workers, running
//! jobs, and the load where the engine can tell), for [`super::autoscale`]
//! and [`super::idle`] to decide from.
//!
//! This module owns the asking; it decides nothing.

use std::time::Duration;

use motorpool_provider::{Instance, tags};

use crate::agent::proto::DriverStatusResponse;
use crate::auth::Credential;
use crate::observe::{Observed, ResourceKind};
use crate::spec::Spec;
use crate::words::Role;

/// How long the controller waits for a driver's agent to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// One cluster's driver, as a pass found it.
#[derive(Debug, Clone)]
pub struct DriverReport {
    pub cluster: String,
    /// The worker count the cluster's nodes record (`motorpool-size`).
    pub size: Option<u32>,
    /// What its agent said; `None`: it did not answer.
    pub status: Option<DriverStatusResponse>,
}

/// Ask the driver of every cluster of `spec` that autoscales or
/// autoterminates, and has a running driver that has not stopped itself.
pub async fn ask_all(
    spec: &Spec,
    observed: &Observed,
    credential: &Credential,
) -> Vec<DriverReport> {
    let mut reports = Vec::new();
    for (name, cluster) in &spec.clusters {
        let autoscales = cluster.autoscale.is_some() && cluster.workers.is_none();
        if !autoscales && cluster.autotermination_minutes.is_none() {
            continue;
        }
        let members = observed.members(ResourceKind::Cluster, name);
        let Some(driver) = members.iter().find(|i| is_live_driver(i)) else {
            continue;
        };
        reports.push(DriverReport {
            cluster: name.clone(),
            size: driver.tag(tags::SIZE).and_then(|s| s.parse().ok()),
            status: ask(driver, credential).await,
        });
    }
    reports
}

/// A running driver of a cluster that has not stopped itself.
fn is_live_driver(i: &Instance) -> bool {
    i.state.is_live()
        && i.tag(tags::ROLE) == Some(Role::Driver.as_str())
        && i.tag(tags::AUTOTERMINATED).is_none()
}

/// What a driver's agent says of its cluster; `None` when it does not
/// answer within [`ASK_TIMEOUT`] (or has no address this machine can dial).
async fn ask(driver: &Instance, credential: &Credential) -> Option<DriverStatusResponse> {
    let address = driver.address.as_deref()?;
    let asked = async {
        let mut agent = crate::bootstrap::run::connect(address, credential)
            .await
            .ok()?;
        agent
            .driver_status(crate::agent::proto::DriverStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    tokio::time::timeout(ASK_TIMEOUT, asked).await.ok()?
}
