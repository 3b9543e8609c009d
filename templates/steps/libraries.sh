# 5. libraries: installed once per machine into a content-addressed cache, then linked into this node.
venv="$MOTORPOOL_NODE_DIR/runtime/venv"
libs={{ cache_dir }}/libs/{{ key }}
mkdir -p -- {{ cache_dir }}/libs
if [ ! -f "$libs/.complete" ]; then
  (
    flock 9
    if [ ! -f "$libs/.complete" ]; then
      rm -rf "$libs.tmp"
      # `--` ends pip's options: a library named `-r...` stays a requirement, never an option.
      {{ python }} -m pip install --disable-pip-version-check --no-input --quiet --target "$libs.tmp" \
        {% for file in requirements %}-r "$MOTORPOOL_STEP_DIR"/{{ file }} {% endfor %}-- {% for lib in pip %}{{ lib }} {% endfor %}
      touch "$libs.tmp/.complete"
      mv "$libs.tmp" "$libs"
    fi
  ) 9>"$libs.lock"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$libs" > "$site/motorpool-libraries.pth"
echo "libraries" {{ key }}":" {% for lib in pip %}{{ lib }} {% endfor %}
