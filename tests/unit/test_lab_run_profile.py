"""The no-op breakdown of bench/rigs_bench.py: pyinfra's --debug log split per fact and per
operation (lab/rigs/run_profile.py)."""

from lab.rigs.run_profile import parse

LOG = [
    (0.5, "--> Loading config..."),
    (1.0, "    [pyinfra.api.facts] Getting fact: deb.DebPackages () (ensure_hosts: None)"),
    (1.1, "    [pyinfra.connectors.ssh] Running command on r1: (pty=False) sh -c 'dpkg -l'"),
    (1.3, "    [pyinfra.connectors.ssh] Command exit status: 0"),
    (1.4, "    [pyinfra.api.facts] Getting fact: deb.DebPackages () (ensure_hosts: None)"),
    (2.0, "    [pyinfra.api.operations] Starting operation {'Base | A'} on r1"),
    (2.1, "    [pyinfra.connectors.ssh] Running command on r1: (pty=False) stat /x"),
    (2.2, "    [pyinfra.connectors.ssh] Command exit status: 0"),
    (2.2, "    [pyinfra.api.operations] Starting operation {'Base | A'} on r2"),
    (2.3, "    [pyinfra.connectors.ssh] Running command on r2: (pty=False) stat /x"),
    (2.5, "    [pyinfra.connectors.ssh] Command exit status: 0"),
    (2.5, "    [pyinfra.api.operations] Starting operation {'Docs | r1.md', 'Docs | r2.md'} "
          "on r1"),
    (3.5, "--> Results:"),
]


def test_prepare_facts_and_operations_are_timed_and_counted():
    p = parse(LOG, start=0.0, end=4.0)
    assert p.total == 4.0
    assert p.prepare == 2.0
    assert p.execute == 1.5
    facts = p.facts["deb.DebPackages"]
    assert (facts.calls, facts.commands) == (2, 1)
    assert round(facts.seconds, 3) == 0.2
    a = p.operations["Base | A"]
    assert (a.commands, round(a.seconds, 3)) == (2, 0.5)
    docs = p.operations["Docs | r1.md / Docs | r2.md"]
    assert (docs.commands, round(docs.seconds, 3)) == (0, 1.0)
    assert p.commands_by_host == {"r1": {"prepare": 1, "execute": 1}, "r2": {"execute": 1}}
    assert p.fact_commands == 1 and p.operation_commands == 2
    assert "commands run on the rigs: 1 for facts, 2 by operations" in "\n".join(p.table())
