"""Converge one rig: `pyinfra inventory/garage.py deploy.py`.

Settings of every host are validated before any operation is added (llm_garage.fleet);
each task then reads only its host's validated `Rig`, plans from the rig's facts
(llm_garage/plans/) and calls our operations. A problem found while the run is prepared ends
it with its message alone, before anything runs on any rig (llm_garage/refusal.py)."""

from pyinfra import host

from llm_garage import deploy_lock, readahead, stack_order
from llm_garage.fleet import fleet_for, rig_for
from llm_garage.refusal import refusals_end_the_run
from tasks import base, docs, engines, gpus, memory, models, opencode, services

stack_order.register_deploy_file(__file__)  # before the first operation is added

with refusals_end_the_run():
    rig = rig_for(host)
    # One deploy per rig: each rig's lock is taken before the first operation, released after
    # the last.
    deploy_lock.hold(host.state, {name: (r.layout.deploy_lock, r.data.deploy_lock_wait_s)
                                  for name, r in fleet_for(host.state).items()})

    # What the plans below read on the rig, in one command (llm_garage/readahead.py).
    readahead.declare(host, [*memory.reads(rig), *engines.reads(rig), *gpus.reads(rig)],
                      while_prepared=True)
    memory.check(rig)  # a profile that cannot fit stops the run before anything changes
    base.prepare(rig)
    engine_plans, engine_changes = engines.converge(rig)
    model_plans, model_changes = models.converge(rig)
    gpus.converge(rig)
    proofs = services.converge(rig, engine_plans, model_plans, engine_changes, model_changes)
    engines.switch_proven(rig, engine_plans, proofs)
    opencode.converge(rig, fleet_for(host.state))
    docs.write(rig, fleet_for(host.state), engine_plans, model_plans)
