//! The local provider: every instance is a real, detached `motorpool agent`
//! process with its own directory and loopback address under `$MOTORPOOL_HOME`.
//! (Being written; see the Provider trait in motorpool-provider.)

use motorpool_provider::NodeType;

/// The local machine's node types: they size what an agent may use, and cost nothing.
pub fn catalog() -> Vec<NodeType> {
    vec![
        NodeType::new("small", 1, 2.0, 0.0),
        NodeType::new("medium", 2, 4.0, 0.0),
        NodeType::new("large", 4, 8.0, 0.0),
    ]
}
