//! motorpool: declarative compute for data jobs.
//!
//! The engine: specs in, plans out, plans applied through the `Provider`
//! trait. The CLI (`main.rs`) is a thin shell around this library.

pub mod spec;
