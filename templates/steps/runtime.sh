# 3. os & runtime setup: the node's Python virtualenv and the motorpool runtime.
venv="$MOTORPOOL_NODE_DIR/runtime/venv"
mkdir -p "$MOTORPOOL_NODE_DIR/runtime"
if [ ! -x "$venv/bin/python" ]; then
  rm -rf "$venv.tmp"
  # No pip inside: making it costs seconds per node; libraries are installed
  # by the machine's pip into a shared cache instead (libraries.sh).
  {{ python }} -m venv --without-pip "$venv.tmp"
  mv "$venv.tmp" "$venv"
fi
ln -sfn -- {{ motorpool_binary }} "$MOTORPOOL_NODE_DIR/runtime/motorpool"
echo "runtime" {{ runtime }}": $("$venv/bin/python" --version 2>&1), $("$MOTORPOOL_NODE_DIR/runtime/motorpool" --version)"
