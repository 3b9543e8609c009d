#!/bin/sh
# cloud-init user data for a motorpool node: steps 1-3 on a cloud VM.
set -eu
mkdir -p /opt/motorpool /var/lib/motorpool
chmod 0700 /var/lib/motorpool
# The runtime, verified by its checksum before it is used.
curl -fsSL {{ runtime_url }} -o /opt/motorpool/motorpool.download
printf '%s  %s\n' {{ runtime_sha256 }} /opt/motorpool/motorpool.download | sha256sum -c -
chmod 0755 /opt/motorpool/motorpool.download
mv /opt/motorpool/motorpool.download /opt/motorpool/motorpool
# The agent's config (its credential): private to the node.
umask 077
printf '%s\n' {{ agent_config }} > /var/lib/motorpool/agent-config.json
instance_id=$(cloud-init query v1.instance_id 2>/dev/null || hostname)
# Values reach the unit through variables: a heredoc would re-parse quoted text.
listen={{ listen }}
cat > /etc/systemd/system/motorpool-agent.service <<UNIT
[Unit]
Description=motorpool node agent
After=network-online.target

[Service]
ExecStart=/opt/motorpool/motorpool agent --dir /var/lib/motorpool --listen $listen --instance-id $instance_id --config /var/lib/motorpool/agent-config.json
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now motorpool-agent.service
