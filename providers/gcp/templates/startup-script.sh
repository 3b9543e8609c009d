#!/bin/sh
# The startup-script of a motorpool node on Compute Engine (run by the guest
# agent at every boot): install the runtime, write the agent's config, start
# the agent; the agent runs the node's startup steps itself and reports each
# one in its instance's `motorpool-step` label.
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
# The instance's zone, name and private address, from the metadata server.
metadata() {
  curl -fsS --retry 5 -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/instance/$1"
}
zone=$(metadata zone)
zone=${zone##*/}
name=$(metadata name)
private_ip=$(metadata network-interfaces/0/ip)
case "$zone/$name" in
  */*/*|/*|*/) echo "motorpool: cannot learn this instance's zone and name (got '$zone/$name')" >&2; exit 1 ;;
esac
# The agent, and the driver or executor it hosts, listen on the private
# address with TLS (the node's certificate from the project CA is in its config).
# Values reach the unit through variables: a heredoc would re-parse quoted text.
listen="$private_ip:"{{ port }}
runtime_port={{ runtime_port }}
instance_id="$zone/$name"
cat > /etc/systemd/system/motorpool-agent.service <<UNIT
[Unit]
Description=motorpool node agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/opt/motorpool/motorpool agent --dir /var/lib/motorpool --listen $listen --runtime-port $runtime_port --instance-id $instance_id --config /var/lib/motorpool/agent-config.json
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now motorpool-agent.service
