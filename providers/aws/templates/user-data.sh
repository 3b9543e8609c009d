#!/bin/sh
# cloud-init user data for a motorpool node: install the runtime, write the
# agent's config, start the agent; the agent runs the node's startup steps
# itself and reports each one in its instance's `motorpool-step` tag.
set -eu
mkdir -p /opt/motorpool /var/lib/motorpool
chmod 0700 /var/lib/motorpool
# The runtime, verified by its checksum before it is used.
curl -fsSL --retry 5 --retry-connrefused -o /opt/motorpool/motorpool.download -- {{ runtime_url }}
printf '%s  %s\n' {{ runtime_sha256 }} /opt/motorpool/motorpool.download | sha256sum -c -
chmod 0755 /opt/motorpool/motorpool.download
mv /opt/motorpool/motorpool.download /opt/motorpool/motorpool
# The agent's config (its credential): private to the node.
umask 077
printf '%s\n' {{ agent_config }} > /var/lib/motorpool/agent-config.json
chmod 0600 /var/lib/motorpool/agent-config.json
# The instance's id and private address, from cloud-init, else from the
# instance metadata service (IMDSv2).
imds() {
  if [ -z "${imds_token:-}" ]; then
    imds_token=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
  fi
  curl -fsS -H "X-aws-ec2-metadata-token: $imds_token" "http://169.254.169.254/latest/meta-data/$1"
}
instance_id=$(cloud-init query v1.instance_id 2>/dev/null || true)
[ -n "$instance_id" ] || instance_id=$(imds instance-id)
case "$instance_id" in
  i-*) ;;
  *) echo "motorpool: cannot learn this instance's id (got '$instance_id')" >&2; exit 1 ;;
esac
private_ip=$(cloud-init query ds.meta_data.local_ipv4 2>/dev/null || true)
[ -n "$private_ip" ] || private_ip=$(imds local-ipv4)
# The agent, and the driver or executor it hosts, listen on the private
# address with TLS (the node's certificate from the project CA is in its config).
# Values reach the unit through variables: a heredoc would re-parse quoted text.
listen="$private_ip:"{{ port }}
cat > /etc/systemd/system/motorpool-agent.service <<UNIT
[Unit]
Description=motorpool node agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/opt/motorpool/motorpool agent --dir /var/lib/motorpool --listen $listen --instance-id $instance_id --config /var/lib/motorpool/agent-config.json
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now motorpool-agent.service
