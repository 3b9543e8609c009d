//! The spec: YAML files in, a validated [`Spec`] out, or every problem found
//! reported as `file:line:col: error: message`.
//! (Loader being written.)

pub mod model;

pub use model::*;
