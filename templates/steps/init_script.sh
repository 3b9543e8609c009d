# 5. an init script: run in the node's directory with the runtime on PATH.
# Its name is the step's name (`init:<name>`); values never go in comments,
# where a newline in one would end the comment and start a command.
export PATH="$MOTORPOOL_NODE_DIR/runtime/venv/bin:$MOTORPOOL_NODE_DIR/runtime:$PATH"
sh -eu "$MOTORPOOL_STEP_DIR"/{{ file }}
