"""What every rig needs before anything else: the service user, the folders we own and the
scripts our operations run on the rig."""

from pyinfra.api import deploy
from pyinfra.operations import apt, files, server

from llm_garage.layout import RIG_SCRIPTS, script_source
from llm_garage.settings import Rig

# Tools our own operations run on the rig (downloader, stamps, health checks).
BASE_PACKAGES = ["python3", "curl", "ca-certificates", "openssl", "git"]


@deploy("Base")
def prepare(rig: Rig) -> None:
    d, layout = rig.data, rig.layout
    apt.packages(name="Install base tools", packages=BASE_PACKAGES)
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
