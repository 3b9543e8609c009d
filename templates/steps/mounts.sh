# 6. security & access: mounts.
{% for m in mounts %}
{% if m.scheme == "path" %}
target="$MOTORPOOL_NODE_DIR/fs"{{ m.target }}
mkdir -p -- "$(dirname -- "$target")"
ln -sfn -- {{ m.source }} "$target"
echo "mounted "{{ m.source }}" at $target"
{% elif m.scheme == "s3" %}
mkdir -p -- {{ m.target }}
mount-s3 {{ m.bucket }} {{ m.target }} {% if m.prefix %}--prefix {{ m.prefix }}{% endif %} {% if m.read_only %}--read-only{% endif %}
{% elif m.scheme == "gs" %}
mkdir -p -- {{ m.target }}
gcsfuse {% if m.prefix %}--only-dir {{ m.prefix }}{% endif %} {% if m.read_only %}-o ro{% endif %} {{ m.bucket }} {{ m.target }}
{% elif m.scheme == "az" %}
mkdir -p -- {{ m.target }}
blobfuse2 mount {{ m.target }} --container-name={{ m.bucket }} {% if m.read_only %}--read-only{% endif %}
{% endif %}
{% endfor %}
echo "mounts done"
