#!/bin/sh
# The custom data of a motorpool node on Azure (run by cloud-init at first
# boot): install the runtime, write the agent's config, start the agent; the
# agent runs the node's startup steps itself and reports each one in its
# VM's `motorpool-step` tag.
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
# The VM's name and private address, from the instance metadata service.
imds() {
  curl -fsS --retry 5 -H 'Metadata: true' "http://169.254.169.254/metadata/instance/$1?api-version=2021-02-01&format=text"
}
name=$(imds compute/name)
private_ip=$(imds network/interface/0/ipv4/ipAddress/0/privateIpAddress)
case "$name" in
  ''|*/*) echo "motorpool: cannot learn this VM's name (got '$name')" >&2; exit 1 ;;
esac
# The agent, and the driver or executor it hosts, listen on the private
# address with TLS (the node's certificate from the project CA is in its config).
# Values reach the unit through variables: a heredoc would re-parse quoted text.
listen="$private_ip:"{{ port }}
runtime_port={{ runtime_port }}
cat > /etc/systemd/system/motorpool-agent.service <<UNIT
[Unit]
Description=motorpool node agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/opt/motorpool/motorpool agent --dir /var/lib/motorpool --listen $listen --runtime-port $runtime_port --instance-id $name --config /var/lib/motorpool/agent-config.json
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now motorpool-agent.service
