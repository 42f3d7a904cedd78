"""The opencode plan: each client's providers (llm_garage/opencode.py), with the context one
request really gets where only the running server can say it.

With `parallel` set, llama-server gives each of its slots `ctx_size / parallel`, and that is
the limit. Without it the engine chooses (newer llama.cpp picks several slots by itself, and
whether they share one unified cache), so the limit is read back from the server: the `n_ctx`
its last passed proof found in `/props` (the proof report, `ProofReports`). A server never
proven gives no limit rather than a guess. One whose last proof failed runs the unit proven
before it (rolled back), and one not part of this run (`--limit`) cannot be asked: both keep
the limit the client's file already has for them, if any.

The plan is made twice: while the run is prepared, from the reports the servers hold then,
and again when the opencode operation runs, after every server of the run was proven."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from llm_garage import opencode
from llm_garage.facts.opencode import ProofReports
from llm_garage.settings import Rig

# (server rig, {profile: report path}) -> {profile: report or None}, or None: not readable now
ReadReports = Callable[[str, dict[str, str]], Mapping[str, Any] | None]


def reads_back(server: Rig, profile: str) -> bool:
    """Whether this profile's limit comes from its running server, not its settings."""
    p = server.profiles[profile]
    return not (p.parallel and p.ctx_size)


def served_contexts(client: Rig, fleet: Mapping[str, Rig], read: ReadReports
                    ) -> tuple[dict[tuple[str, str], int], set[tuple[str, str]]]:
    """(server, profile) -> n_ctx one request gets, for every profile `client` lists whose
    limit comes from its server and whose last proof passed; and the (server, profile) pairs
    that cannot say now: their server is not in this run, or their last proof failed."""
    served: dict[tuple[str, str], int] = {}
    unread: set[tuple[str, str]] = set()
    for name in sorted(fleet):
        server = fleet[name]
        wanted = {p: server.layout.proof_report(p) for p in sorted(server.enabled_profiles)
                  if reads_back(server, p) and opencode.base_url(client, server, p)}
        if not wanted:
            continue
        reports = read(name, wanted)
        if reports is None:
            unread |= {(name, p) for p in wanted}
            continue
        for profile in wanted:
            report = reports.get(profile)
            if not isinstance(report, dict):
                continue
            n_ctx = report.get("n_ctx")
            if report.get("ok") is True and type(n_ctx) is int and n_ctx > 0:
                served[(name, profile)] = n_ctx
            elif report.get("ok") is False:
                unread.add((name, profile))
    return served, unread


def written_context(existing: Mapping | None, provider: str, alias: str) -> int | None:
    """limit.context of one model as the client's opencode.json has it, if it has one."""
    try:
        context = existing["provider"][provider]["models"][alias]["limit"]["context"]
    except (KeyError, TypeError):
        return None
    return context if type(context) is int and context > 0 else None


def providers(client: Rig, fleet: Mapping[str, Rig], read: ReadReports,
              existing: Mapping | None = None) -> dict[str, Any]:
    """The client's providers, limits read back where the settings cannot say; where the
    server cannot say now, the limit `existing` (the client's current opencode.json) has."""
    served, unread = served_contexts(client, fleet, read)
    for name, profile in sorted(unread):
        server = fleet[name]
        pid = opencode.provider_id(client.data.opencode_provider, name,
                                   server.profiles[profile].port)
        context = written_context(existing, pid, server.alias(profile))
        if context:
            served[(name, profile)] = context
    return opencode.providers_for(client, fleet, served)


def reader(state) -> ReadReports:
    """Reads the reports on a server of this pyinfra run; None for a host that is not in it
    (not connected, or failed earlier in the run)."""

    def read(name: str, reports: dict[str, str]) -> Mapping[str, Any] | None:
        server = state.inventory.get_host(name, None)
        if server is None or server not in state.active_hosts:
            return None
        return server.get_fact(ProofReports, reports=reports)

    return read


def when_asked(state, client: Rig, fleet: Mapping[str, Rig]
               ) -> Callable[[Mapping | None], dict[str, Any]]:
    """`providers` made each time it is called with the client's current opencode.json (or
    None), from the reports of this run's servers then: what an operation that decides again
    when it runs is given."""
    read = reader(state)
    return lambda existing=None: providers(client, fleet, read, existing)
