"""Converge one rig: `pyinfra inventory/garage.py deploy.py`.

Settings of every host are validated before any operation is added (llm_garage.fleet);
each task then reads only its host's validated `Rig`."""

from pyinfra import host

from llm_garage.fleet import fleet_for, rig_for
from tasks import base, engines, gpus, models, opencode, services

rig = rig_for(host)

base.prepare(rig)
built = engines.converge(rig)
fetched = models.converge(rig)
gpus.converge(rig)
services.converge(rig, engines=built, models=fetched)
opencode.converge(rig, fleet_for(host.state))
