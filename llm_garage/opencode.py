"""opencode.json for the coding agent: our providers, built from the fleet, merged into the
user's own file. Pure functions; `tasks/opencode.py` applies them to client hosts.

One provider per served endpoint. opencode sends a provider's requests to its one
`options.baseURL`, and the fleet serves each model from its own rig and port, so each enabled
profile gets a provider `<opencode_provider>-<rig>-<port>` whose `models` holds that server's
alias (the id its /v1/models answers) with `limit.context` = the context one request gets:
the profile's -c divided by --parallel when both are set, else what the running server reports
(`served`, read back by llm_garage/plans/opencode.py), else no limit. The provider
keys `<opencode_provider>` and `<opencode_provider>-*` belong to llm-garage: a run replaces
them all (so a removed profile disappears) and keeps every other key the user wrote."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from .settings import Rig

SCHEMA_URL = "https://opencode.ai/config.json"
NPM_PACKAGE = "@ai-sdk/openai-compatible"
BACKUP_SUFFIX = ".llm-garage.orig"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CLOSING = re.compile(r"\s*[}\]]")


class OpencodeConfigError(ValueError):
    """An existing opencode.json that cannot be merged without losing the user's settings."""


def provider_id(prefix: str, rig_name: str, port: int) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]', '-', rig_name)}-{port}"


def is_ours(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "-")


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def base_url(client: Rig, server: Rig, profile: str) -> str | None:
    """How `client` reaches the server of `profile` on `server`; None when it cannot (a server
    bound to loopback is reachable from its own rig only)."""
    listen = server.profiles[profile].listen
    port = server.profiles[profile].port
    if listen in LOOPBACK:
        if client.name != server.name:
            return None
        return f"http://{_url_host(listen)}:{port}/v1"
    return f"http://{_url_host(server.address)}:{port}/v1"


def request_context(server: Rig, profile: str,
                    served: Mapping[tuple[str, str], int] | None = None) -> int | None:
    """The context one request gets. With `parallel` and -c set, llama-server gives each slot
    -c / parallel. Otherwise the engine decides (newer llama.cpp picks several slots by itself,
    and whether they share one cache): what the running server reported, `served[(server,
    profile)]`, or None when it has not been read back."""
    p = server.profiles[profile]
    if p.parallel and p.ctx_size:
        return p.ctx_size // p.parallel
    return (served or {}).get((server.name, profile))


def model_entry(client: Rig, server: Rig, profile: str,
                served: Mapping[tuple[str, str], int] | None = None) -> dict[str, Any]:
    """The model as opencode needs it: limits only when the context size is known, and then
    both of them (opencode refuses `limit` without `output`). The output limit never exceeds
    the context."""
    alias = server.alias(profile)
    entry: dict[str, Any] = {"name": f"{alias} ({server.name})"}
    context = request_context(server, profile, served)
    if context:
        d = client.data
        output = d.opencode_output_limits.get(alias, d.opencode_output_limit)
        entry["limit"] = {"context": context, "output": min(output, context)}
    return entry


def providers_for(client: Rig, fleet: Mapping[str, Rig],
                  served: Mapping[tuple[str, str], int] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Every enabled profile of the fleet that `client` can reach, one provider each, in a
    stable order; `served`: (server, profile) -> the context its running server reported."""
    d = client.data
    providers: dict[str, dict[str, Any]] = {}
    for server_name in sorted(fleet):
        server = fleet[server_name]
        for profile in sorted(server.enabled_profiles):
            url = base_url(client, server, profile)
            if url is None:
                continue
            p = server.profiles[profile]
            options: dict[str, Any] = {"baseURL": url}
            if p.api_key_env:
                # opencode substitutes {env:NAME} itself: the key stays out of the file.
                options["apiKey"] = "{env:" + p.api_key_env + "}"
            providers[provider_id(d.opencode_provider, server.name, p.port)] = {
                "npm": NPM_PACKAGE,
                "name": f"{d.opencode_provider_name} ({server.name}:{p.port})",
                "options": options,
                "models": {server.alias(profile): model_entry(client, server, profile, served)},
            }
    return providers


def merge(existing: Mapping[str, Any] | None, providers: Mapping[str, Any],
          prefix: str) -> dict[str, Any]:
    """The user's config with our providers replaced: every other key and provider kept as
    written and where it was, ours (`prefix`, `prefix-*`) dropped and `providers` appended."""
    if existing is None:
        return {"$schema": SCHEMA_URL, "provider": copy.deepcopy(dict(providers))}
    config = copy.deepcopy(dict(existing))
    theirs = config.get("provider", {})
    if not isinstance(theirs, Mapping):
        raise OpencodeConfigError(f'"provider" is {type(theirs).__name__}, not an object')
    merged = {k: v for k, v in theirs.items() if not is_ours(k, prefix)}
    merged.update(copy.deepcopy(dict(providers)))
    config["provider"] = merged
    return config


def dumps(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def loads(text: str) -> tuple[dict[str, Any], bool]:
    """Parse opencode.json as opencode does (JSON with comments and trailing commas).
    Returns the object and whether the text held comments (which a rewrite does not keep)."""
    stripped, had_comments = _strip_jsonc(text)
    try:
        value = json.loads(stripped)
    except ValueError as e:
        raise OpencodeConfigError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise OpencodeConfigError(f"holds a JSON {type(value).__name__}, not an object")
    return value, had_comments


def _string_end(text: str, i: int) -> int:
    """Index just past the JSON string starting at text[i] == '"'."""
    j = i + 1
    while j < len(text) and text[j] != '"':
        j += 2 if text[j] == "\\" else 1
    return j + 1


def _strip_jsonc(text: str) -> tuple[str, bool]:
    out: list[str] = []
    i, n, had_comments = 0, len(text), False
    while i < n:
        if text[i] == '"':
            j = _string_end(text, i)
            out.append(text[i:j])
            i = j
        elif text.startswith("//", i):
            had_comments = True
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            had_comments = True
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            out.append(" ")
        else:
            out.append(text[i])
            i += 1
    text, out = "".join(out), []
    i, n = 0, len(text)
    while i < n:  # drop trailing commas (a comma before } or ]), outside strings
        if text[i] == '"':
            j = _string_end(text, i)
            out.append(text[i:j])
            i = j
            continue
        if text[i] == "," and _CLOSING.match(text, i + 1):
            i += 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out), had_comments
