//! motorpool: declarative compute for data jobs.
//!
//! The engine: specs in ([`spec`]), observed state from the providers
//! ([`observe`]), plans as data ([`plan`]), plans applied through the
//! `Provider` trait ([`apply`]), and the node agent ([`agent`]). [`engine`]
//! wires the stages together for the CLI (`main.rs`), which holds no logic.

pub mod agent;
pub mod apply;
pub mod auth;
pub mod bootstrap;
pub mod cli;
pub mod confine;
pub mod controller;
pub mod engine;
pub mod engines;
pub mod home;
pub mod jobs;
pub mod observe;
pub mod plan;
pub mod proto;
pub mod providers;
pub mod registry;
pub mod runtime;
pub mod runtime_upload;
pub mod schedule;
pub mod secrets;
pub mod spec;
pub mod tls;
pub mod words;
