#!/bin/sh
# cloud-init user data for a motorpool node: install the runtime, write the
# agent's config, start the agent; the agent runs the node's startup steps
# itself and reports each one in its instance's `motorpool-step` tag. A
# failure before the agent runs is reported in the same tag by this script.
set -eu
# Files go under / on a node (a test plays a node with another root), and the
# instance metadata service is the standard one unless the AWS SDKs' override says.
root=${MOTORPOOL_NODE_ROOT:-}
imds_endpoint=${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}
imds_endpoint=${imds_endpoint%/}
ec2_endpoint={{ node.endpoint | default("") }}
mkdir -p "$root/opt/motorpool" "$root/var/lib/motorpool" "$root/etc/systemd/system"
chmod 0700 "$root/var/lib/motorpool"
# The instance metadata service (IMDSv2).
imds() {
  if [ -z "${imds_token:-}" ]; then
    imds_token=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$imds_endpoint/latest/api/token")
  fi
  curl -fsS -H "X-aws-ec2-metadata-token: $imds_token" "$imds_endpoint/latest/meta-data/$1"
}
# One field of the instance role's credentials (a JSON document, a field a line).
json_field() {
  printf '%s\n' "$2" | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" | head -n 1
}
# Report a failure in the instance's own tags (EC2 CreateTags, signed with the
# instance role's credentials), as the agent reports its steps, then stop.
fail() {
  message=$1
  echo "motorpool: $message" >&2
  role=$(imds iam/security-credentials/ 2>/dev/null | head -n 1 || true)
  region=$(imds placement/region 2>/dev/null || true)
  if [ -n "$role" ] && [ -n "$region" ] && [ -n "${instance_id:-}" ]; then
    creds=$(imds "iam/security-credentials/$role" || true)
    set -- --aws-sigv4 "aws:amz:$region:ec2" --user "$(json_field AccessKeyId "$creds"):$(json_field SecretAccessKey "$creds")"
    token=$(json_field Token "$creds")
    if [ -n "$token" ]; then
      set -- "$@" -H "x-amz-security-token: $token"
    fi
    curl -fsS -o /dev/null "$@" \
      --data-urlencode Action=CreateTags --data-urlencode Version=2016-11-15 \
      --data-urlencode "ResourceId.1=$instance_id" \
      --data-urlencode Tag.1.Key=motorpool-step --data-urlencode Tag.1.Value=failed:runtime \
      --data-urlencode Tag.2.Key=motorpool-failure --data-urlencode "Tag.2.Value=$message" \
      "${ec2_endpoint:-https://ec2.$region.amazonaws.com}/" || echo "motorpool: cannot tag the instance failed" >&2
  fi
  exit 1
}
# The instance's id and private address, from cloud-init, else from the
# instance metadata service.
instance_id=$(cloud-init query v1.instance_id 2>/dev/null || true)
[ -n "$instance_id" ] || instance_id=$(imds instance-id)
case "$instance_id" in
  i-*) ;;
  *) echo "motorpool: cannot learn this instance's id (got '$instance_id')" >&2; exit 1 ;;
esac
private_ip=$(cloud-init query ds.meta_data.local_ipv4 2>/dev/null || true)
[ -n "$private_ip" ] || private_ip=$(imds local-ipv4)
# The runtime, verified by its checksum before it is used.
download="$root/opt/motorpool/motorpool.download"
curl -fsSL --retry 5 --retry-connrefused -o "$download" -- {{ runtime_url }} || fail "cannot download the motorpool runtime (curl exit $?)"
want={{ runtime_sha256 }}
got=$(sha256sum "$download" | cut -d ' ' -f 1)
if [ "$got" != "$want" ]; then
  rm -f "$download"
  fail "the downloaded runtime's SHA-256 is $got, not the runtime_sha256 $want"
fi
chmod 0755 "$download"
mv "$download" "$root/opt/motorpool/motorpool"
# The agent's config (its credential): private to the node.
umask 077
printf '%s\n' {{ agent_config }} > "$root/var/lib/motorpool/agent-config.json"
chmod 0600 "$root/var/lib/motorpool/agent-config.json"
# The agent, and the driver or executor it hosts (on the runtime port), listen
# on the private address with TLS (the node's certificate from the project CA
# is in its config). Values reach the unit through variables: a heredoc would
# re-parse quoted text.
listen="$private_ip:"{{ port }}
runtime_port={{ runtime_port }}
cat > "$root/etc/systemd/system/motorpool-agent.service" <<UNIT
[Unit]
Description=motorpool node agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$root/opt/motorpool/motorpool agent --dir $root/var/lib/motorpool --listen $listen --runtime-port $runtime_port --instance-id $instance_id --config $root/var/lib/motorpool/agent-config.json
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now motorpool-agent.service
