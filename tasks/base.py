"""What every rig needs before anything else: the service user, the folders we own and the
scripts our operations run on the rig."""

from pyinfra.api import deploy

from llm_garage.layout import RIG_SCRIPTS, script_source
from llm_garage.operations import packages, paths
from llm_garage.settings import Rig

# Tools our own operations run on the rig (downloader, stamps, health checks).
BASE_PACKAGES = ["python3", "curl", "ca-certificates", "openssl", "git"]


@deploy("Base")
def prepare(rig: Rig) -> None:
    d, layout = rig.data, rig.layout
    packages.installed(name="Install base tools", packages=BASE_PACKAGES)
    # Its groups, the user and its home folder: one operation, one command when in place.
    paths.service_account(name=f"Ensure service user {d.service_user} and its groups",
                          user=d.service_user, groups=d.service_groups,
                          home=layout.service_home, shell="/usr/sbin/nologin")
    # Root owns everything the service only reads; the service writes nowhere here. One
    # operation for all the folders and one for all the scripts: one command each on a rig
    # where they are in place.
    paths.folders(name="Ensure " + ", ".join(layout.rig_dirs), paths=layout.rig_dirs,
                  user="root", group="root", mode="755")
    paths.files_installed(name=f"Install rig scripts into {layout.bin_dir}",
                          files={layout.script(s): script_source(s) for s in RIG_SCRIPTS},
                          user="root", group="root", mode="755")
