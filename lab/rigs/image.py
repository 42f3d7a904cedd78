"""The rigs' root filesystems: Debian bookworm by debootstrap, built once and cached.

Two images, built the same way from their own package lists: `FULL` (the default), which
already holds the tools the deploy installs so that most tests stay fast and offline, and
`MINIMAL`, a bare Debian 12 with systemd, SSH and python3 only, on which a deploy must install
everything it needs itself. Each is cached under its own name, keyed by its package list.

``GARAGE_RIG_CACHE`` moves the cache (default /var/cache/llm-garage/rigs)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab.rigs.host import _run, _step
from lab.rigs.network import _host_resolv_conf
from lab.rigs.registry import list_fleets

log = logging.getLogger("garage.rigs")

HARNESS_VERSION = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"

# Installed into the base: the deploys under test install their build dependencies with apt,
# and finding them already there keeps the tests fast and offline.
BASE_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "git",
    "curl",
    "ca-certificates",
    "sudo",
    "iproute2",
    "procps",
    "build-essential",
    "cmake",
    "ccache",
    "libssl-dev",
    "openssl",
)

# The bare image: what a minimal Debian 12 with systemd, an SSH server and python3 has. No git,
# curl, CA certificates, compilers, cmake or ccache.
MINIMAL_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
)

# Units that only get in the way inside a short-lived test container.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-networkd-wait-online.service",
    "systemd-journal-flush.service",  # the journal is volatile: nothing to flush
    "getty@tty1.service",
)

DEFAULT_CACHE_DIR = Path("/var/cache/llm-garage/rigs")


def _cache_dir() -> Path:
    return Path(os.environ.get("GARAGE_RIG_CACHE") or DEFAULT_CACHE_DIR)



@dataclass(frozen=True)
class Image:
    """One root filesystem variant: its cache folder is `<prefix>-<key>`, the key covering
    the harness version, suite, mirror, packages, masked units and whether apt's package lists
    are kept (`apt_lists`; without them the first `apt-get install` fails until an update,
    as on a fresh cloud or container image)."""

    prefix: str
    packages: tuple[str, ...]
    apt_lists: bool = True

    def key(self) -> str:
        spec = {
            "version": HARNESS_VERSION,
            "suite": SUITE,
            "mirror": MIRROR,
            "packages": sorted(self.packages),
            "masked": sorted(MASKED_UNITS),
        }
        if self.prefix != "base":  # the full image's key predates variants: kept as it was
            spec["image"] = self.prefix
            spec["apt_lists"] = self.apt_lists
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


FULL = Image("base", BASE_PACKAGES)
MINIMAL = Image("minimal", MINIMAL_PACKAGES, apt_lists=False)


def base_key(image: Image = FULL) -> str:
    return image.key()


def base_path(cache_dir: Path | None = None, image: Image = FULL) -> Path:
    return (cache_dir or _cache_dir()) / f"{image.prefix}-{image.key()}"


def ensure_base(cache_dir: Path | None = None, image: Image = FULL) -> Path:
    """The cached root filesystem of `image`, built first if missing. Safe to call
    concurrently."""
    cache_dir = cache_dir or _cache_dir()
    final = base_path(cache_dir, image)
    if (final / ".garage-base").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".garage-base").is_file():
            return final
        for stale in [*cache_dir.glob(f".tmp-{image.prefix}-*"),
                      *cache_dir.glob(f".trash-{image.prefix}-*")]:
            log.info("removing half-built image %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".tmp-{image.prefix}-{image.key()}-{os.getpid()}"
        with _step(f"building rootfs {final.name} (debootstrap {SUITE}, one-off)"):
            try:
                _build_base(tmp, cache_dir / "debs", image)
                if final.exists():  # a directory without the marker is not a base
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _remove_unused_bases(cache_dir, keep=final, image=image)
    return final


def _remove_unused_bases(cache_dir: Path, keep: Path, image: Image = FULL) -> None:
    """Old builds of the same image (another package list or harness version) that no fleet
    uses any more. Other images' folders are left alone."""
    in_use = {e["base"] for e in list_fleets()} | {str(keep)}
    for old in cache_dir.glob(f"{image.prefix}-*"):
        if str(old) not in in_use:
            log.info("removing unused image %s (in the background)", old.name)
            trash = cache_dir / f".trash-{old.name}-{os.getpid()}"
            os.rename(old, trash)
            subprocess.Popen(
                ["rm", "-rf", "--one-file-system", str(trash)],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )


def _build_base(root: Path, deb_cache: Path, image: Image = FULL) -> None:
    deb_cache.mkdir(parents=True, exist_ok=True)
    with _step("debootstrap"):
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--components=main",
                f"--include={','.join(image.packages)}",
                f"--cache-dir={deb_cache}",
                SUITE,
                str(root),
                MIRROR,
            ],
            timeout=1800,
        )

    def write(rel: str, text: str, mode: int = 0o644) -> None:
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
        path.chmod(mode)

    write(
        "/etc/apt/sources.list",
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n",
    )
    write(
        "/etc/apt/apt.conf.d/90garage-rig",
        'Acquire::Languages "none";\nAPT::Install-Recommends "false";\n',
    )
    write("/etc/dpkg/dpkg.cfg.d/garage-rig-unsafe-io", "force-unsafe-io\n")
    write("/etc/resolv.conf", _host_resolv_conf())
    write("/etc/hostname", "rig\n")
    write(
        "/etc/ssh/sshd_config.d/garage-rig.conf",
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UseDNS no\n",
    )
    write(
        "/etc/systemd/journald.conf.d/garage-rig.conf",
        "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n",
    )

    with _step("apt-get update and upgrade in the base"):
        env = "DEBIAN_FRONTEND=noninteractive"
        _run(
            [
                "systemd-nspawn",
                "-q",
                "-D",
                str(root),
                "--register=no",
                "--keep-unit",
                "--resolv-conf=off",
                "--timezone=off",
                "--link-journal=no",
                "--pipe",
                "sh",
                "-euc",
                f"apt-get -q update && {env} apt-get -qy -o Dpkg::Options::=--force-confold "
                "upgrade && apt-get clean"
                + ("" if image.apt_lists else " && find /var/lib/apt/lists -maxdepth 1 -type f "
                   "! -name lock -delete"),
            ],
            timeout=1800,
        )

    # sshd in a container: pam_loginuid cannot always write the audit login uid.
    pam = root / "etc/pam.d/sshd"
    if pam.is_file():
        pam.write_text(
            re.sub(
                r"^session\s+required\s+pam_loginuid\.so",
                "session optional pam_loginuid.so",
                pam.read_text(),
                flags=re.M,
            )
        )
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # Empty machine-id: every rig gets its own at first start.
    write("/etc/machine-id", "", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    units = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / ".garage-base").write_text(
        json.dumps(
            {
                "key": image.key(),
                "image": image.prefix,
                "version": HARNESS_VERSION,
                "suite": SUITE,
                "packages": list(image.packages),
                "apt_lists": image.apt_lists,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n"
    )

