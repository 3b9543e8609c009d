# 3. os & runtime setup, Spark: Java 17 or newer, and the pinned pyspark
# installed once per machine (a pool does this ahead of time: it is the slow part).
java_major=""
have_java() {
  command -v java >/dev/null 2>&1 || return 1
  java_major=$(java -version 2>&1 | sed -n 's/.* version "\([0-9][0-9]*\).*/\1/p' | head -n 1)
  [ -n "$java_major" ] && [ "$java_major" -ge 17 ]
}
if ! have_java; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing openjdk-17-jre-headless"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless
  fi
  if ! have_java; then
    echo "Spark needs Java 17 or newer on the node and it has none: install openjdk-17-jre-headless, or put a java 17+ on the PATH" >&2
    exit 1
  fi
fi
engine={{ cache_dir }}/engines/spark-{{ version }}
mkdir -p -- {{ cache_dir }}/engines
if [ ! -f "$engine/.complete" ]; then
  (
    flock 9
    if [ ! -f "$engine/.complete" ]; then
      rm -rf "$engine"
      echo "installing" {{ package }} "(once per machine)"
      # A venv is not relocatable: it is made where it stays, and counts once complete.
      {{ python }} -m venv "$engine/venv"
      "$engine/venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet -- {{ package }}
      touch "$engine/.complete"
    fi
  ) 9>"$engine.lock"
fi
mkdir -p "$MOTORPOOL_NODE_DIR/runtime"
ln -sfn -- "$engine" "$MOTORPOOL_NODE_DIR/runtime/engine"
# What is installed, read from the package's metadata (importing pyspark costs a second).
installed=$(cd "$engine"/venv/lib/python3*/site-packages && ls -d pyspark-*.dist-info)
echo "engine spark" {{ version }}": ${installed%.dist-info}, java $java_major"
