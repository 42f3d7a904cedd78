"""The rig document, written on the controller from what the rig reports at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from llm_garage import readahead, rigdoc
from llm_garage.facts.gpu import GpuInventory
from llm_garage.facts.rigdoc import RigReport
from llm_garage.layout import service_name, unit_path
from llm_garage.readahead import reads_ahead
from llm_garage.settings import Rig


def _write(docs_dir: str, data: dict) -> None:
    for path in rigdoc.write(docs_dir, data):
        host.log(f"wrote {path}")


def _report_read(rig: Rig, engines: Mapping, models: Mapping) -> dict:
    layout = rig.layout
    return {"models_dir": rig.data.models_dir,
            "engines": {name: plan.builds_dir for name, plan in engines.items()},
            "services": [(p, service_name(p), unit_path(service_name(p)),
                          layout.proof_report(p)) for p in sorted(rig.enabled_profiles)],
            "snapshots": {name: plan.snapshot for name, plan in models.items()}}


@reads_ahead(lambda rig, engines, models, **_: [(RigReport, _report_read(rig, engines, models)),
                                                (GpuInventory, {})])
@operation()
def documented(rig: Rig, docs_dir: str, engines: Mapping, models: Mapping,
               opencode_providers: Mapping | None = None):
    """
    Write the rig document (``<docs_dir>/<rig>.md`` and ``<rig>.json``) on the machine running
    pyinfra, from facts read when the operation runs, after the rig's other operations.

    + rig: the rig's settings
    + docs_dir: the folder on the controller
    + engines, models: the deploy's plans (name -> BuildPlan / ModelPlan)
    + opencode_providers: what this rig's opencode.json was given (None: no opencode client)

    Nothing is run on the rig but two read-only facts. A file is rewritten (atomically) only
    when its content changes, so a run that changes nothing on the rig changes nothing here
    and reports no change. While the deploy is prepared the rig has not converged yet: the
    document is written when the operation runs.

    **Example:**

    .. code:: python

        rigdoc.documented(name="Rig document", rig=rig, docs_dir="docs/rigs",
                          engines=engine_plans, models=model_plans)
    """
    if not host.state.is_executing:
        host.noop(f"{docs_dir}/{rig.name}.md is written from what the rig reports once its "
                  "operations have run")
        return
    report = {**readahead.read(RigReport, **_report_read(rig, engines, models)),
              "gpus": readahead.read(GpuInventory)}
    data = rigdoc.collect(rig, report, engines, models, opencode_providers)
    rigdoc.keep_bench(docs_dir, data)
    if not rigdoc.pending(docs_dir, data):
        host.noop(f"{docs_dir}/{rig.name}.md and .json are up to date")
        return
    yield FunctionCommand(_write, (docs_dir, data), {})
