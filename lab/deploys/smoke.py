"""Smoke deploy for the test rigs: a file, a systemd unit installed, enabled and running.

Host data: ``smoke_message`` (written to /var/lib/garage-smoke/hello.txt, served by the unit
over HTTP on ``smoke_port``, default 8077).
"""

from io import StringIO

from pyinfra import host
from pyinfra.operations import files, systemd

message = host.data.get("smoke_message", f"hello from {host.name}")
port = int(host.data.get("smoke_port", 8077))

UNIT = f"""\
[Unit]
Description=llm-garage smoke test HTTP server
After=network.target

[Service]
ExecStart=/usr/bin/python3 -m http.server {port} --bind 0.0.0.0 --directory /var/lib/garage-smoke
DynamicUser=no
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

files.put(
    name="Write the smoke message",
    src=StringIO(message + "\n"),
    dest="/var/lib/garage-smoke/hello.txt",
    mode="644",
)

unit = files.put(
    name="Install garage-smoke.service",
    src=StringIO(UNIT),
    dest="/etc/systemd/system/garage-smoke.service",
    mode="644",
)

systemd.service(
    name="Run garage-smoke.service",
    service="garage-smoke.service",
    running=True,
    enabled=True,
    daemon_reload=unit.will_change,
    restarted=unit.will_change,
)
