"""Hugging Face on the controller: a model's revision to a commit, its file set to exact paths
with size and sha256, before any host is touched.

Only the HTTP API is used (`requests`), the way huggingface_hub uses it:
`GET {endpoint}/api/models/{repo}/revision/{revision}` gives the commit, and
`GET {endpoint}/api/models/{repo}/tree/{commit}?recursive=True` (paginated through the `Link:
rel="next"` header) lists every file with its size and, for LFS files, the sha256 of its
content. `HF_ENDPOINT`, `HF_TOKEN`, `HF_TOKEN_PATH`, `HF_HOME` and `HF_HUB_OFFLINE` mean what
they mean to Hugging Face's own tools. A `Resolver` caches what it learns, so N rigs serving one
model cost one API round."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import requests

from .refusal import Refusal

DEFAULT_ENDPOINT = "https://huggingface.co"
SHA1_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# llama.cpp's split naming: <prefix>-00001-of-00004.gguf (gguf-split's "%s-%05d-of-%05d.gguf").
SHARD_RE = re.compile(r"(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf")
TIMEOUT = (10, 60)
MAX_PAGES = 10_000


# --- endpoint and token, as huggingface_hub reads them ----------------------------------------

def endpoint(environ: Mapping[str, str] | None = None) -> str:
    """`HF_ENDPOINT`, else https://huggingface.co, without a trailing slash."""
    env = os.environ if environ is None else environ
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token_path(environ: Mapping[str, str] | None = None) -> Path:
    """`HF_TOKEN_PATH`, else `$HF_HOME/token` (HF_HOME: `$XDG_CACHE_HOME/huggingface`, else
    `~/.cache/huggingface`): where `hf auth login` stores the token."""
    env = os.environ if environ is None else environ
    if env.get("HF_TOKEN_PATH"):
        return Path(env["HF_TOKEN_PATH"]).expanduser()
    cache = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    return Path(home).expanduser() / "token"


def token(environ: Mapping[str, str] | None = None) -> str | None:
    """The token Hugging Face's tools would send: `HF_TOKEN` (or the older
    `HUGGING_FACE_HUB_TOKEN`), else the token file; None when there is none."""
    env = os.environ if environ is None else environ
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = (env.get(var) or "").strip()
        if value:
            return value
    try:
        value = token_path(env).read_text().strip()
    except OSError:
        return None
    return value or None


def token_source(environ: Mapping[str, str] | None = None) -> str:
    """Where `token()` found the token, in words (never the token itself)."""
    env = os.environ if environ is None else environ
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if (env.get(var) or "").strip():
            return f"the {var} environment variable"
    return f"the token file {token_path(env)}"


def offline(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return (env.get("HF_HUB_OFFLINE") or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL: the token goes only to the endpoint's origin."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def resolve_url(base: str, repo: str, commit: str, path: str) -> str:
    """The download URL of one file at one commit (it redirects to the CDN for LFS files)."""
    return f"{base}/{repo}/resolve/{commit}/{quote(path)}"


# --- what the inventory asks for, what it resolved to -----------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    """What the inventory asks for: a repository, a revision and one selector."""

    repo: str
    revision: str
    kind: str  # "quant" | "include" | "files"
    value: str | tuple[str, ...]

    @classmethod
    def of(cls, model) -> Spec:
        """From a settings `Model`."""
        kind, value = model.selector()
        if kind == "files":
            value = tuple(value)
        return cls(model.repo, model.revision, kind, value)

    @property
    def selector(self) -> dict[str, Any]:
        return {self.kind: list(self.value) if self.kind == "files" else self.value}

    def describe(self) -> str:
        value = ", ".join(self.value) if self.kind == "files" else self.value
        return f"{self.repo}@{self.revision} {self.kind}={value}"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of a repository at a commit."""

    path: str  # path in the repository
    size: int
    sha256: str

    @property
    def name(self) -> str:
        """Base name: every file of a model lands in one folder under this name."""
        return posixpath.basename(self.path)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A `Spec` pinned: the commit and the exact files. `files[0]` is the file llama-server
    loads (`-m`): the single file, or the first shard of a split model."""

    spec: Spec
    commit: str
    files: tuple[RemoteFile, ...]
    needs_token: bool = False  # gated or private: downloads need a token

    @property
    def main(self) -> RemoteFile:
        return self.files[0]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def url(self, base: str, f: RemoteFile) -> str:
        return resolve_url(base, self.spec.repo, self.commit, f.path)


class HfError(Refusal):
    """A model that cannot be resolved; the message names the model, the problem and the fix."""


@dataclasses.dataclass
class Problem:
    """One resolution problem of one spec (the caller adds which models/hosts use it)."""

    spec: Spec
    problem: str
    fix: str

    def text(self, users: str = "") -> str:
        who = f"{users} " if users else ""
        return f"{who}({self.spec.describe()}): {self.problem}\n      fix: {self.fix}"


class ResolveProblem(Exception):
    def __init__(self, problem: Problem):
        super().__init__(problem.text())
        self.problem = problem


def human_size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# --- selection ----------------------------------------------------------------------------------

def _quant_re(quant: str) -> re.Pattern:
    # The quant must stand alone between separators: Q6_K does not select UD-Q6_K_XL files.
    return re.compile(r"(^|[/.-])" + re.escape(quant.lower()) + r"($|[/.-])")


def _select(spec: Spec, files: dict[str, dict]) -> list[str]:
    """Repository paths chosen by the selector (before the completeness checks)."""
    if spec.kind == "quant":
        pattern = _quant_re(spec.value)
        chosen = []
        for path in files:
            name = posixpath.basename(path).lower()
            if not name.endswith(".gguf") or name.startswith("mmproj"):
                continue
            if pattern.search(path.lower()[: -len(".gguf")]):
                chosen.append(path)
        return sorted(chosen)
    if spec.kind == "include":
        pattern = spec.value + "*" if spec.value.endswith("/") else spec.value
        return sorted(p for p in files if fnmatch.fnmatchcase(p, pattern))
    return list(spec.value)


def _units(paths: Iterable[str]) -> tuple[dict[tuple, dict[int, str]], list[str]]:
    """Split GGUF sets by (folder, prefix, count) -> {index: path}; the other .gguf files."""
    sets: dict[tuple, dict[int, str]] = {}
    singles = []
    for path in paths:
        folder, name = posixpath.split(path)
        m = SHARD_RE.fullmatch(name)
        if m:
            key = (folder, m["prefix"], int(m["count"]))
            sets.setdefault(key, {})[int(m["index"])] = path
        elif name.lower().endswith(".gguf"):
            singles.append(path)
    return sets, singles


def _shard_name(key: tuple, index: int) -> str:
    folder, prefix, count = key
    return posixpath.join(folder, f"{prefix}-{index:05d}-of-{count:05d}.gguf")


def choose_files(spec: Spec, commit: str, tree: dict[str, dict]) -> list[str]:
    """The selected paths, main file first; raises ResolveProblem with the fix."""

    def fail(problem, fix):
        raise ResolveProblem(Problem(spec, problem, fix))

    ggufs = sorted(p for p in tree if p.lower().endswith(".gguf"))
    available = ", ".join(ggufs[:12]) + (" ..." if len(ggufs) > 12 else "") or "none"
    at = f"at commit {commit[:12]}"
    paths = _select(spec, tree)
    if spec.kind == "files":
        absent = [p for p in paths if p not in tree]
        if absent:
            fail(f"{', '.join(absent)} not in the repository {at} (.gguf files there: "
                 f"{available})", "list paths exactly as the repository names them")
        if len(set(paths)) != len(paths):
            fail("a path is listed twice", "list each file once")
    if not paths:
        what = {"quant": f"quant {spec.value!r} matches no .gguf file",
                "include": f"include {spec.value!r} matches no file"}[spec.kind]
        fail(f"{what} {at} (.gguf files there: {available})",
             "use a quant name or glob from the list, or pin the revision that has it")

    sets, singles = _units(paths)
    for key, shards in sorted(sets.items()):
        count = key[2]
        missing = [i for i in range(1, count + 1) if i not in shards]
        if not missing:
            continue
        names = [_shard_name(key, i) for i in missing]
        in_repo = [n for n in names if n in tree]
        if in_repo:
            fail(f"incomplete split model: {len(shards)} of {count} shards selected, "
                 f"missing {', '.join(in_repo)}",
                 "select every shard: list them all in files, or use quant/include")
        fail(f"incomplete split model: the repository {at} has {len(shards)} of {count} "
             f"shards of {_shard_name(key, 1)} (missing {', '.join(names)})",
             "pin a revision where the upload is complete")

    units = [[s[i] for i in sorted(s)] for _, s in sorted(sets.items())] + [[p] for p in singles]
    if spec.kind != "files" and len(units) != 1:
        found = ", ".join(u[0] for u in units) if units else "none"
        fail(f"selects {len(units)} models, expected one (first files: {found})",
             "narrow the quant or include, or name the files explicitly with files")
    if not units:
        fail("selects no .gguf file", "include the model's .gguf file(s)")

    # Main unit first: the first listed file's unit for `files`, else the only unit.
    first = paths[0] if spec.kind == "files" else units[0][0]
    main = next((u for u in units if first in u), units[0])
    ordered = list(main) + [p for p in paths if p not in main]

    names: dict[str, str] = {}
    for p in ordered:
        name = posixpath.basename(p)
        if name in names:
            fail(f"{names[name]} and {p} share the file name {name!r}; all files of a model "
                 "land in one folder", "select files with distinct names")
        names[name] = p
    return ordered


# --- the resolver -------------------------------------------------------------------------------

def token_refusals(gated: Mapping[tuple[str, str], str], token_value: str,
                   timeout: float = 20) -> list[str]:
    """Ask each endpoint whether it takes the token, before any rig downloads: `gated` maps
    (endpoint, repo) to the URL of one of its files at the pinned commit. One line per
    endpoint and repo that refused it (401/403); an endpoint that cannot be reached is not
    a refusal (the rig may have every file already)."""
    refused = []
    for (base, repo), url in sorted(gated.items()):
        try:
            response = requests.head(url, headers={"Authorization": f"Bearer {token_value}"},
                                     allow_redirects=False, timeout=timeout)
        except requests.RequestException:
            continue
        if response.status_code in (401, 403):
            refused.append(f"{repo}: {base} refused the Hugging Face token from "
                           f"{token_source()} (HTTP {response.status_code}); set a token that "
                           "may read it (HF_TOKEN, or `hf auth login`)")
    return refused


class Resolver:
    """Resolves specs through the Hugging Face API, caching revisions and trees for the run."""

    def __init__(self, base: str | None = None, hf_token: str | None | bool = True,
                 session: requests.Session | None = None, retries: int = 2,
                 backoff: float = 1.0):
        self.base = (base or endpoint()).rstrip("/")
        self.token = token() if hf_token is True else (hf_token or None)
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "llm-garage"
        self.retries = retries
        self.backoff = backoff
        self.api_calls = 0
        self._commits: dict[tuple[str, str], tuple[str, bool]] = {}
        self._trees: dict[tuple[str, str], dict[str, dict]] = {}
        self._resolved: dict[Spec, Resolved] = {}
        self._failed: dict[Spec, Problem] = {}

    # HTTP ---------------------------------------------------------------------------------
    def _get(self, url: str, *, use_token: bool = True, stream: bool = False,
             params: dict | None = None, method: str = "GET") -> requests.Response:
        headers = {}
        if use_token and self.token and origin(url) == origin(self.base):
            headers["Authorization"] = f"Bearer {self.token}"
        attempt = 0
        while True:
            self.api_calls += 1
            try:
                response = self.session.request(method, url, headers=headers, params=params,
                                                timeout=TIMEOUT, stream=stream,
                                                allow_redirects=method != "HEAD")
            except requests.RequestException as e:
                if attempt >= self.retries:
                    raise _Unreachable(f"cannot reach {self.base}: {type(e).__name__}") from None
            else:
                if response.status_code < 500 and response.status_code != 429:
                    return response
                if attempt >= self.retries:
                    return response
                response.close()
            attempt += 1
            time.sleep(self.backoff * attempt)

    def _http_problem(self, spec: Spec, response: requests.Response, what: str) -> Problem:
        code = response.status_code
        error_code = response.headers.get("X-Error-Code", "")
        page = f"{self.base}/{spec.repo}"
        if code in (401, 403) and not self.token:
            return Problem(spec, f"Hugging Face refused {what} without a token (HTTP {code}): "
                                 "the repository is gated or private, or does not exist",
                           f"accept the model's terms at {page} if it is gated, then export "
                           "HF_TOKEN=<token> (or run `hf auth login`) where pyinfra runs")
        if code == 401:
            return Problem(spec, f"Hugging Face refused the token from {token_source()} "
                                 f"(HTTP 401): it is invalid or expired",
                           "create a read token at https://huggingface.co/settings/tokens "
                           "and export HF_TOKEN=<token>")
        if code == 403:
            return Problem(spec, f"the token from {token_source()} has no access to this "
                                 f"repository (HTTP 403{', ' + error_code if error_code else ''})",
                           f"request access at {page}, or use a token with read access")
        if code == 404:
            if error_code == "RevisionNotFound" or (
                    error_code != "RepoNotFound" and self._repo_exists(spec.repo)):
                return Problem(spec, f"revision {spec.revision!r} does not exist in the "
                                     "repository",
                               f"a branch, tag or commit listed at {page}")
            return Problem(spec, "repository not found (HTTP 404)",
                           f"check the owner/name spelling at {page}")
        return Problem(spec, f"Hugging Face answered HTTP {code} for {what}",
                       "try again later; or deploy from a lock file (llm-garage lock)")

    def _repo_exists(self, repo: str) -> bool:
        try:
            r = self._get(f"{self.base}/api/models/{repo}")
        except _Unreachable:
            return False
        r.close()
        return r.status_code == 200

    def _json(self, spec: Spec, response: requests.Response, what: str):
        try:
            return response.json()
        except ValueError:
            raise ResolveProblem(Problem(spec, f"{what}: the answer is not JSON",
                                         "check HF_ENDPOINT")) from None

    # API ----------------------------------------------------------------------------------
    def commit(self, spec: Spec) -> tuple[str, bool]:
        """(commit SHA, needs a token) of spec.revision."""
        key = (spec.repo, spec.revision)
        if key in self._commits:
            return self._commits[key]
        url = f"{self.base}/api/models/{spec.repo}/revision/{quote(spec.revision, safe='')}"
        what = f"revision {spec.revision!r}"
        try:
            response = self._get(url)
        except _Unreachable as e:
            raise ResolveProblem(Problem(spec, str(e), _OFFLINE_FIX)) from None
        if response.status_code != 200:
            raise ResolveProblem(self._http_problem(spec, response, what))
        info = self._json(spec, response, what)
        sha = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(sha, str) or not SHA1_RE.fullmatch(sha):
            raise ResolveProblem(Problem(spec, f"{what}: no commit SHA in the answer",
                                         "check HF_ENDPOINT"))
        self._commits[key] = (sha, self._needs_token(spec, info))
        return self._commits[key]

    def _needs_token(self, spec: Spec, info: dict) -> bool:
        gated, private = info.get("gated"), info.get("private")
        if gated not in (None, False) or private is True:
            return True
        if gated is False and private is False:
            return False
        if not self.token:
            return False  # answered without a token: public
        # The answer does not say; ask once without the token.
        url = f"{self.base}/api/models/{spec.repo}/revision/{quote(spec.revision, safe='')}"
        try:
            r = self._get(url, use_token=False)
        except _Unreachable:
            return True
        r.close()
        return r.status_code in (401, 403)

    def tree(self, spec: Spec, commit: str) -> dict[str, dict]:
        """Every file of the repository at `commit`: path -> {size, sha256 (LFS) or None}."""
        key = (spec.repo, commit)
        if key in self._trees:
            return self._trees[key]
        url: str | None = f"{self.base}/api/models/{spec.repo}/tree/{commit}"
        params: dict | None = {"recursive": "True", "expand": "False"}
        files: dict[str, dict] = {}
        seen = set()
        while url:
            if url in seen or len(seen) > MAX_PAGES:
                raise ResolveProblem(Problem(spec, "the tree listing's pages loop",
                                             "check HF_ENDPOINT"))
            seen.add(url)
            try:
                response = self._get(url, params=params)
            except _Unreachable as e:
                raise ResolveProblem(Problem(spec, str(e), _OFFLINE_FIX)) from None
            if response.status_code != 200:
                raise ResolveProblem(self._http_problem(spec, response, "the file listing"))
            entries = self._json(spec, response, "the file listing")
            if not isinstance(entries, list):
                raise ResolveProblem(Problem(spec, "the file listing is not a list",
                                             "check HF_ENDPOINT"))
            for entry in entries:
                if not isinstance(entry, dict) or entry.get("type") != "file":
                    continue
                lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else None
                sha = (lfs or {}).get("oid") or (lfs or {}).get("sha256")
                size = (lfs or {}).get("size", entry.get("size"))
                files[entry["path"]] = {"size": size, "sha256": sha}
            nxt = response.links.get("next", {}).get("url")
            url = urljoin(response.url, nxt) if nxt else None
            params = None  # the next link carries its own query
        self._trees[key] = files
        return files

    def _sha256_small(self, spec: Spec, commit: str, path: str) -> str:
        """sha256 of a file stored without LFS (small by Hugging Face's rules)."""
        url = resolve_url(self.base, spec.repo, commit, path)
        try:
            response = self._get(url, stream=True)
        except _Unreachable as e:
            raise ResolveProblem(Problem(spec, str(e), _OFFLINE_FIX)) from None
        with response:
            if response.status_code != 200:
                raise ResolveProblem(self._http_problem(spec, response, path))
            digest = hashlib.sha256()
            for chunk in response.iter_content(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def _check_access(self, spec: Spec, commit: str, path: str) -> None:
        """For a gated repository: does the token let us download? (HEAD, no redirect)"""
        url = resolve_url(self.base, spec.repo, commit, path)
        try:
            response = self._get(url, method="HEAD")
        except _Unreachable as e:
            raise ResolveProblem(Problem(spec, str(e), _OFFLINE_FIX)) from None
        response.close()
        if response.status_code in (401, 403):
            raise ResolveProblem(self._http_problem(spec, response, "downloads"))

    def resolve(self, spec: Spec) -> Resolved:
        """Pin one spec; raises ResolveProblem (with the fix) when it cannot."""
        if spec in self._resolved:
            return self._resolved[spec]
        if spec in self._failed:
            raise ResolveProblem(self._failed[spec])
        try:
            commit, needs_token = self.commit(spec)
            if needs_token and not self.token:
                page = f"{self.base}/{spec.repo}"
                raise ResolveProblem(Problem(
                    spec, "the repository is gated or private and no Hugging Face token is set",
                    f"accept the model's terms at {page}, then export HF_TOKEN=<token> (or run "
                    "`hf auth login`) where pyinfra runs"))
            tree = self.tree(spec, commit)
            paths = choose_files(spec, commit, tree)
            if needs_token:
                self._check_access(spec, commit, paths[0])
            files = []
            for path in paths:
                meta = tree[path]
                size = meta["size"]
                if not isinstance(size, int) or size < 0:
                    raise ResolveProblem(Problem(spec, f"{path}: no size in the listing",
                                                 "check HF_ENDPOINT"))
                sha = meta["sha256"]
                if sha is None:
                    sha = self._sha256_small(spec, commit, path)
                if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
                    raise ResolveProblem(Problem(spec, f"{path}: no sha256 in the listing",
                                                 "check HF_ENDPOINT"))
                files.append(RemoteFile(path, size, sha))
        except ResolveProblem as e:
            self._failed[spec] = e.problem
            raise
        resolved = Resolved(spec, commit, tuple(files), needs_token)
        self._resolved[spec] = resolved
        return resolved


class _Unreachable(Exception):
    pass


_OFFLINE_FIX = ("check the network and HF_ENDPOINT, or deploy from a lock file written "
                "earlier with `llm-garage lock <inventory>`")


def resolve_all(resolver: Resolver, wanted: Mapping[Spec, list[str]]) -> dict[Spec, Resolved]:
    """Resolve every spec; `wanted` maps each to who uses it ("model 'x' on host 'a'").
    Raises one HfError listing every problem."""
    out, problems = {}, []
    for spec, users in wanted.items():
        try:
            out[spec] = resolver.resolve(spec)
        except ResolveProblem as e:
            problems.append(e.problem.text(", ".join(users)))
    if problems:
        raise HfError(f"{len(problems)} model(s) cannot be resolved on Hugging Face "
                      f"({resolver.base}); nothing was changed on any host:\n"
                      + "\n".join(f"  - {p}" for p in problems))
    return out
