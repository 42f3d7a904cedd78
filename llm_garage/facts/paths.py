"""Facts about several paths at once: one command reads them all."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class PathStates(FactBase):
    """`{path: {"type", "mode", "user", "group", "sha256"}}` for each of `paths` that exists:
    `type` is `dir`, `file`, `link` (never followed) or `other`; `mode` as `stat -c %a`
    prints it (`755`); `sha256` for a regular file when `hash_files`, else None. A path that
    does not exist is left out."""

    default = dict

    def command(self, paths: list[str], hash_files: bool = True):
        listed = " ".join(shlex.quote(p) for p in paths)
        digest = ('"$(sha256sum < "$p" | cut -c1-64)"' if hash_files else "-")
        return ("for p in " + listed + "; do "
                'if [ -L "$p" ]; then t=link; elif [ -d "$p" ]; then t=dir; '
                'elif [ -f "$p" ]; then t=file; elif [ -e "$p" ]; then t=other; '
                "else continue; fi; "
                'if [ "$t" = file ]; then h=' + digest + '; else h=-; fi; '
                "printf '%s\\t%s\\t%s\\t%s\\n' \"$t\" \"$(stat -c '%a %U %G' -- \"$p\")\" "
                '"$h" "$p"; done; true')

    def process(self, output):
        states = {}
        for line in output:
            parts = line.rstrip("\n").split("\t", 3)
            if len(parts) != 4:
                continue
            kind, owner, digest, path = parts
            mode, user, group = (owner.split() + ["", "", ""])[:3]
            states[path] = {"type": kind, "mode": mode, "user": user, "group": group,
                            "sha256": digest if digest not in ("", "-") else None}
        return states


class ServiceAccount(FactBase):
    """The service user and what it belongs to, in one command: `passwd` (its
    `getent passwd` fields, or None), `groups` (which of `groups` exist), `member_of` (the
    groups listing it as a member) and `home` (None, `link`, `other`, or
    `{"user", "group"}` of the folder)."""

    def command(self, user: str, groups: list[str], home: str):
        q = shlex.quote
        listed = " ".join(q(g) for g in groups)
        return (f"getent passwd {q(user)} | sed 's/^/passwd=/'; "
                + (f'for g in {listed}; do getent group "$g" > /dev/null && '
                   "printf 'group=%s\\n' \"$g\"; done; " if groups else "")
                + f"getent group | awk -F: -v u={q(user)} "
                "'{n = split($4, m, \",\"); for (i = 1; i <= n; i++) "
                "if (m[i] == u) print \"member=\" $1}'; "
                f"if [ -L {q(home)} ]; then echo home=link; elif [ -d {q(home)} ]; then "
                f"printf 'home=%s\\n' \"$(stat -c '%U %G' -- {q(home)})\"; "
                f"elif [ -e {q(home)} ]; then echo home=other; fi; true")

    def process(self, output):
        passwd, groups, member_of, home = None, [], [], None
        for line in output:
            key, _, value = line.rstrip("\n").partition("=")
            if key == "passwd":
                fields = value.split(":")
                if len(fields) >= 7:
                    passwd = {"name": fields[0], "uid": fields[2], "gid": fields[3],
                              "home": fields[5], "shell": fields[6]}
            elif key == "group":
                groups.append(value)
            elif key == "member":
                member_of.append(value)
            elif key == "home":
                if value in ("link", "other"):
                    home = value
                else:
                    owner = value.split()
                    home = {"user": owner[0] if owner else "",
                            "group": owner[1] if len(owner) > 1 else ""}
        return {"passwd": passwd, "groups": groups, "member_of": sorted(member_of),
                "home": home}
