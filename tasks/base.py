"""What every rig needs before anything else: the service user, the folders we own and the
scripts our operations run on the rig."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, server

from llm_garage.layout import RIG_SCRIPTS, script_source
from llm_garage.settings import Rig

# Tools our own operations run on the rig (downloader, stamps, health checks).
BASE_PACKAGES = ["python3", "curl", "ca-certificates", "openssl", "git"]


def install_packages(name: str, packages: list[str]) -> None:
    """apt-get install what is missing, after an `apt-get update` only then: a fresh rig may
    have no package lists, or lists older than its mirror, and a no-op run fetches nothing."""
    installed = host.get_fact(DebPackages)
    missing = [p for p in packages if p not in installed]
    apt.packages(name=name, packages=packages, update=bool(missing))


@deploy("Base")
def prepare(rig: Rig) -> None:
    d, layout = rig.data, rig.layout
    install_packages("Install base tools", BASE_PACKAGES)
    for group in d.service_groups:
        server.group(name=f"Ensure group {group}", group=group, system=True)
    server.user(name=f"Ensure service user {d.service_user}", user=d.service_user, system=True,
                shell="/usr/sbin/nologin", home=layout.service_home, create_home=False,
                groups=d.service_groups)
    # Root owns everything the service only reads; the service writes nowhere here.
    for path in layout.rig_dirs:
        files.directory(name=f"Ensure {path}", path=path, user="root", group="root", mode="755")
    for script in RIG_SCRIPTS:
        files.put(name=f"Install {script}", src=script_source(script),
                  dest=layout.script(script), add_deploy_dir=False, user="root", group="root",
                  mode="755")
