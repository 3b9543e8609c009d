//! The project lock held in EC2: a security group named
//! `motorpool-lock-<project>` ([`lock_group_name`]) in the region's default VPC.
//!
//! EC2 creates a security group atomically by name within a VPC: a second
//! `CreateSecurityGroup` with the same name fails with
//! `InvalidGroup.Duplicate`, so of two takers at once exactly one gets it. The
//! group is created with its tags (`TagSpecifications`, atomic with the
//! create): the lock's id, owner, pid, command, since and expiry; the
//! description repeats the id and first expiry, so a group read before its
//! tags would still say whose it is. The holder renews the lease by
//! rewriting the expiry tag (`CreateTags` on its own group id).
//!
//! Taking over an expired lock is race-free: the taker deletes the expired
//! group *by its group id*, then creates the name again. Two takers of one
//! expired lock may both delete (the second's delete finds nothing), but only
//! one create succeeds; the other finds the new, unexpired group and is
//! refused. A late taker whose delete comes after the new group exists
//! deletes nothing, because the id it read is that of the old group.
//! Release and `force-unlock` delete the group by id after checking its lock id.
//!
//! This file owns only the lock; it must not touch instances.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{ResourceType, SecurityGroup, TagSpecification};
use motorpool_provider::{LockAttempt, LockInfo, ProviderError, Result, tags};

use crate::errors::from_sdk;
use crate::{filter, tag};

const ID_TAG: &str = "motorpool-lock-id";
const OWNER_TAG: &str = "motorpool-lock-owner";
const PID_TAG: &str = "motorpool-lock-pid";
const COMMAND_TAG: &str = "motorpool-lock-command";
const SINCE_TAG: &str = "motorpool-lock-since";
const EXPIRES_TAG: &str = "motorpool-lock-expires";

/// How many create/read rounds a take tries before it reports the lock as
/// held by whoever holds it then (each round is one lost race).
const ROUNDS: usize = 4;

/// The lock's security group name for `project`.
pub fn lock_group_name(project: &str) -> String {
    format!("motorpool-lock-{project}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The region's default VPC: where the lock lives (names are unique per VPC).
async fn default_vpc(client: &Client) -> Result<String> {
    let out = client
        .describe_vpcs()
        .filters(filter("is-default", ["true"]))
        .send()
        .await
        .map_err(|e| ProviderError::from(from_sdk("DescribeVpcs", e)))?;
    out.vpcs()
        .iter()
        .find_map(|v| v.vpc_id().map(str::to_string))
        .ok_or_else(|| {
            ProviderError::invalid(
                Some("provider.region".to_string()),
                "the region has no default VPC, where motorpool keeps the project lock (a \
                 security group); create one with `aws ec2 create-default-vpc`",
            )
        })
}

/// The lock group of `project` in `vpc`, with what it says, if it exists.
async fn read(client: &Client, vpc: &str, project: &str) -> Result<Option<(String, LockInfo)>> {
    let out = client
        .describe_security_groups()
        .filters(filter("group-name", [lock_group_name(project).as_str()]))
        .filters(filter("vpc-id", [vpc]))
        .send()
        .await
        .map_err(|e| ProviderError::from(from_sdk("DescribeSecurityGroups", e)))?;
    let name = lock_group_name(project);
    Ok(out
        .security_groups()
        .iter()
        .filter(|g| g.group_name() == Some(name.as_str()))
        .find_map(|g| Some((g.group_id()?.to_string(), info_of(g)))))
}

/// What a lock group says. Whatever cannot be read is left empty; an expiry
/// that cannot be read from the tag comes from the description, and failing
/// both counts as run out (a group that says nothing holds nothing).
fn info_of(group: &SecurityGroup) -> LockInfo {
    let tag_of = |key: &str| {
        group
            .tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_string)
    };
    let description = group.description().unwrap_or_default();
    let described = |key: &str| {
        description
            .split_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    LockInfo {
        id: tag_of(ID_TAG)
            .or_else(|| described("id"))
            .unwrap_or_default(),
        owner: tag_of(OWNER_TAG).unwrap_or_else(|| "an unknown holder".to_string()),
        pid: tag_of(PID_TAG).and_then(|p| p.parse().ok()).unwrap_or(0),
        command: tag_of(COMMAND_TAG).unwrap_or_default(),
        since: tag_of(SINCE_TAG).and_then(|p| p.parse().ok()).unwrap_or(0),
        expires: tag_of(EXPIRES_TAG)
            .or_else(|| described("expires"))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
    }
}

/// Create the lock group, tagged at birth. `Ok(None)`: the name is taken.
async fn create(
    client: &Client,
    vpc: &str,
    project: &str,
    lock: &LockInfo,
) -> Result<Option<String>> {
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::SecurityGroup)
        .tags(tag(tags::PROJECT, project))
        .tags(tag(ID_TAG, &lock.id))
        .tags(tag(OWNER_TAG, &lock.owner))
        .tags(tag(PID_TAG, &lock.pid.to_string()))
        .tags(tag(COMMAND_TAG, &lock.command))
        .tags(tag(SINCE_TAG, &lock.since.to_string()))
        .tags(tag(EXPIRES_TAG, &lock.expires.to_string()))
        .build();
    // Only characters EC2 allows in a group description.
    let description = format!(
        "motorpool project lock id={} expires={}",
        lock.id, lock.expires
    );
    let created = client
        .create_security_group()
        .group_name(lock_group_name(project))
        .description(description)
        .vpc_id(vpc)
        .tag_specifications(tags)
        .send()
        .await;
    match created {
        Ok(out) => out
            .group_id()
            .map(|id| Some(id.to_string()))
            .ok_or_else(|| {
                ProviderError::Internal("CreateSecurityGroup answered without a group id".into())
            }),
        Err(e) => {
            let e = from_sdk("CreateSecurityGroup", e);
            if e.code.as_deref() == Some("InvalidGroup.Duplicate") {
                Ok(None)
            } else {
                Err(e.into())
            }
        }
    }
}

/// Delete a lock group by id; gone already is fine.
async fn delete(client: &Client, group_id: &str) -> Result<()> {
    match client
        .delete_security_group()
        .group_id(group_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = from_sdk("DeleteSecurityGroup", e);
            if is_not_found(e.code.as_deref()) {
                Ok(())
            } else {
                Err(e.into())
            }
        }
    }
}

fn is_not_found(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("InvalidGroup.NotFound" | "InvalidGroupId.NotFound" | "InvalidGroupId.Malformed")
    )
}

pub(crate) async fn try_lock(
    client: &Client,
    project: &str,
    lock: &LockInfo,
) -> Result<LockAttempt> {
    let vpc = default_vpc(client).await?;
    let mut taken_over = None;
    let mut last_seen = None;
    for _ in 0..ROUNDS {
        if create(client, &vpc, project, lock).await?.is_some() {
            return Ok(LockAttempt::Taken { taken_over });
        }
        let Some((group_id, held)) = read(client, &vpc, project).await? else {
            continue; // released meanwhile: try the name again
        };
        if held.id == lock.id {
            // Ours: an earlier try created it and its answer was lost.
            return Ok(LockAttempt::Taken { taken_over });
        }
        if !held.expired(now()) {
            return Ok(LockAttempt::Held(held));
        }
        // Run out: remove exactly that group (by id), then race for the name.
        delete(client, &group_id).await?;
        last_seen = Some(held.clone());
        taken_over = Some(held);
    }
    match last_seen {
        Some(held) => Ok(LockAttempt::Held(held)),
        None => Err(ProviderError::Server(format!(
            "the lock group {} kept changing hands while it was being taken; try again",
            lock_group_name(project)
        ))),
    }
}

pub(crate) async fn renew_lock(client: &Client, project: &str, lock: &LockInfo) -> Result<()> {
    let vpc = default_vpc(client).await?;
    let Some((group_id, held)) = read(client, &vpc, project).await? else {
        return Err(ProviderError::NotFound(format!(
            "the lock group {} is gone",
            lock_group_name(project)
        )));
    };
    if held.id != lock.id {
        return Err(ProviderError::NotFound(format!(
            "the lock group {} is now lock {} of {}",
            lock_group_name(project),
            held.id,
            held.owner
        )));
    }
    client
        .create_tags()
        .resources(&group_id)
        .tags(tag(EXPIRES_TAG, &lock.expires.to_string()))
        .send()
        .await
        .map_err(|e| {
            let e = from_sdk("CreateTags", e);
            if is_not_found(e.code.as_deref()) {
                ProviderError::NotFound(format!("the lock group {group_id} is gone"))
            } else {
                e.into()
            }
        })?;
    Ok(())
}

pub(crate) async fn read_lock(client: &Client, project: &str) -> Result<Option<LockInfo>> {
    let vpc = default_vpc(client).await?;
    Ok(read(client, &vpc, project).await?.map(|(_, info)| info))
}

pub(crate) async fn unlock(client: &Client, project: &str, id: &str) -> Result<()> {
    let vpc = default_vpc(client).await?;
    let Some((group_id, held)) = read(client, &vpc, project).await? else {
        return Ok(());
    };
    if held.id != id {
        return Err(ProviderError::NotFound(format!(
            "the lock of project `{project}` is {} (held by {}), not {id}",
            held.id, held.owner
        )));
    }
    delete(client, &group_id).await
}
