# 5. init script {{ name }} ({{ index }} of {{ count }}): run in the node's directory with the runtime on PATH.
export PATH="$MOTORPOOL_NODE_DIR/runtime/venv/bin:$MOTORPOOL_NODE_DIR/runtime:$PATH"
sh -eu "$MOTORPOOL_STEP_DIR"/{{ file }}
