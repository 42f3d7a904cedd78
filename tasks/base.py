"""What every rig needs before anything else: the service user and the folders we own."""

from pyinfra.api import deploy
from pyinfra.operations import apt, files, server

from llm_garage.settings import Rig

# Tools our own operations run on the rig (downloader, stamps, health checks).
BASE_PACKAGES = ["python3", "curl", "ca-certificates", "openssl", "git"]


@deploy("Base")
def prepare(rig: Rig) -> None:
    d = rig.data
    apt.packages(name="Install base tools", packages=BASE_PACKAGES)
    for group in d.service_groups:
        server.group(name=f"Ensure group {group}", group=group, system=True)
    server.user(
        name=f"Ensure service user {d.service_user}",
        user=d.service_user,
        system=True,
        shell="/usr/sbin/nologin",
        home=d.garage_root + "/home",
        create_home=False,
        groups=d.service_groups,
    )
    # Root owns everything the service only reads; the service writes nowhere here.
    for path in (d.garage_root, rig.state_dir, d.models_dir):
        files.directory(name=f"Ensure {path}", path=path, user="root", group="root", mode="755")
