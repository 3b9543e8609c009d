//! Cluster startup: the seven ordered steps of DESIGN.md, one code path for
//! every provider.
//!
//! 1. request — the plan's action for the cluster (recorded by apply)
//! 2. allocate — idle pool instances re-tagged, or new ones launched (apply's ops)
//! 3. os & runtime setup — the node's virtualenv and the motorpool runtime;
//!    pool instances do it ahead of time, which is why pools are fast
//! 4. formation — the driver starts on the driver node; executors register
//! 5. libraries — cluster libraries and init scripts, in order, on every node
//! 6. security & access — mounts (the cluster credential guards the driver
//!    and executors since formation)
//! 7. ready — the driver reports every executor registered
//!
//! This module owns what a cluster needs to start ([`BootSpec`], carried by
//! the plan), how each step becomes a script ([`steps`], from `templates/`),
//! and running the steps over the nodes' agents ([`run`]). It never decides
//! *whether* a cluster needs starting: the planner does.

pub mod cloud;
pub mod run;
pub mod saga;
pub mod steps;
pub mod template;

pub use crate::words::{BootSpec, MountSpec, NamedFile, STEPS, Step};
