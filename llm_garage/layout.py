"""Every path on a rig, defined once: read any path here, nowhere else.

Two settings anchor them: `garage_root` (sources, builds, ccache, state, our scripts) and
`models_dir` (the blob store and the model folders). Fixed system places (systemd's unit
folder, our secrets folder) are constants. Names of units and services are here too, since
paths derive from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

UNIT_DIR = "/etc/systemd/system"
SECRETS_DIR = "/etc/llm-garage"  # root-only; hidden from every service we write
GPU_POWER_UNIT = "llm-garage-gpu-power.service"
SERVER_UNIT_GLOB = "llama-server-*.service"
# The scripts our operations run on the rig, shipped in the package's files/ folder and
# installed into `bin_dir` by one loop (tasks/base.py).
RIG_SCRIPTS = ("garage-bench", "garage-build", "garage-cuda", "garage-fetch",
               "garage-server-check")
PACKAGE_FILES = Path(__file__).resolve().parent / "files"


def unit_path(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}"


def service_name(profile: str) -> str:
    """The systemd service of a profile."""
    return f"llama-server-{profile}.service"


def _stem(profile: str) -> str:
    return service_name(profile).removesuffix(".service")


# Files of a service beside its unit, by folder and suffix: removed with the service.
SERVICE_STATE_SUFFIXES = (".service", ".service.proven", ".inputs", ".failed", ".proof.json")


# The model store (see tasks/models.py): every model file once, as `<blobs_dir>/<sha256>`,
# with its stamp, its partial download and its writer's lock beside it. garage-fetch derives
# the same three names from the blob's path (`<blob>.stamp`, `.partial`, `.lock`).
BLOBS_FOLDER = ".blobs"
SNAPSHOT_ID_LENGTH = 12  # a snapshot folder is named by the first 12 hex digits of its commit


def blob_path(blobs_dir: str, sha256: str) -> str:
    return f"{blobs_dir}/{sha256}"


def blob_stamp(blobs_dir: str, sha256: str) -> str:
    """`size mtime sha256 [verified]`, written by garage-fetch after hashing the blob."""
    return f"{blob_path(blobs_dir, sha256)}.stamp"


def blob_partial(blobs_dir: str, sha256: str) -> str:
    """A download in progress, renamed into the blob once its size and sha256 match."""
    return f"{blob_path(blobs_dir, sha256)}.partial"


def blob_lock(blobs_dir: str, sha256: str) -> str:
    """flock'ed by the one garage-fetch writing or linking the blob (and by the prune)."""
    return f"{blob_path(blobs_dir, sha256)}.lock"


def snapshot_id(commit: str) -> str:
    return commit[:SNAPSHOT_ID_LENGTH]


def server_unit_files(service_inputs_dir: str) -> tuple[str, ...]:
    """Globs of every llama-server unit on a rig that may name a model file: the installed
    units, the rendered (wanted) ones and the copies of the last proven ones."""
    return (f"{UNIT_DIR}/{SERVER_UNIT_GLOB}", f"{service_inputs_dir}/{SERVER_UNIT_GLOB}",
            f"{service_inputs_dir}/{SERVER_UNIT_GLOB}.proven")


def script_source(script: str) -> str:
    """Where a rig-side script lives in the installed package (on the controller)."""
    return str(PACKAGE_FILES / script)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The paths of one rig, from its settings (`Rig.layout`)."""

    garage_root: str
    models_dir: str
    model_dirs: Mapping[str, str | None] = dataclasses.field(default_factory=dict)

    # --- under garage_root ---
    @property
    def bin_dir(self) -> str:
        return f"{self.garage_root}/bin"

    def script(self, script: str) -> str:
        """A rig-side script (one of RIG_SCRIPTS) as installed on the rig."""
        return f"{self.bin_dir}/{script}"

    @property
    def service_home(self) -> str:
        """Home of the service user: never created, nothing is written there."""
        return f"{self.garage_root}/home"

    @property
    def src_dir(self) -> str:
        return f"{self.garage_root}/src"

    @property
    def builds_dir(self) -> str:
        return f"{self.garage_root}/builds"

    @property
    def ccache_dir(self) -> str:
        return f"{self.garage_root}/ccache"

    @property
    def cuda_dir(self) -> str:
        """The CUDA toolkits llm-garage installs (`cuda_toolkit: "13.0"`), one folder each."""
        return f"{self.garage_root}/cuda"

    def cuda_toolkit_dir(self, release: str) -> str:
        """One installed toolkit: `bin/nvcc`, `include`, `lib64` (links into the unpacked
        wheels) and its `stamp`, written last. Never deleted: builds link against it."""
        return f"{self.cuda_dir}/{release}"

    def cuda_nvcc(self, release: str) -> str:
        return f"{self.cuda_toolkit_dir(release)}/bin/nvcc"

    def cuda_stamp(self, release: str) -> str:
        return f"{self.cuda_toolkit_dir(release)}/stamp"

    @property
    def state_dir(self) -> str:
        return f"{self.garage_root}/state"

    @property
    def deploy_lock(self) -> str:
        """Held by the one deploy running on this rig (llm_garage/deploy_lock.py)."""
        return f"{self.state_dir}/deploy.lock"

    @property
    def gpu_power_unit(self) -> str:
        """The GPU boot unit as rendered, installed from here (see operations.unit_installed)."""
        return f"{self.state_dir}/{GPU_POWER_UNIT}"

    @property
    def engine_pins(self) -> str:
        """Record of the commit each tag resolved to on this rig (a moved tag is refused)."""
        return f"{self.state_dir}/engine-pins"

    @property
    def service_inputs_dir(self) -> str:
        return f"{self.state_dir}/services"

    def engine_source_dir(self, engine: str) -> str:
        """One stable checkout per engine, full history."""
        return f"{self.src_dir}/{engine}"

    def engine_builds_dir(self, engine: str) -> str:
        """One folder per build (`<commit12>-<flagshash>`), plus the `current` link."""
        return f"{self.builds_dir}/{engine}"

    def engine_current(self, engine: str) -> str:
        """The engine's last build that every profile using it proved (or, with no profile,
        the last one built)."""
        return f"{self.engine_builds_dir(engine)}/current"

    def server_binary(self, engine: str, build_key: str = "current") -> str:
        """llama-server of one build (units name their build, not `current`)."""
        return f"{self.engine_builds_dir(engine)}/{build_key}/bin/llama-server"

    def load_flags_file(self, engine: str, build_key: str = "current") -> str:
        """How one build's llama-server takes no_mmap and mlock (settings.LOAD_FLAGS),
        written by garage-build before the stamp, read by the units that need it."""
        return f"{self.engine_builds_dir(engine)}/{build_key}/load-flags.env"

    # --- models ---
    @property
    def blobs_dir(self) -> str:
        """Every model file once, named by its sha256 (shared by models and revisions)."""
        return f"{self.models_dir}/{BLOBS_FOLDER}"

    def blob(self, sha256: str) -> str:
        return blob_path(self.blobs_dir, sha256)

    def model_dir(self, model: str) -> str:
        """A model's folder: its `dir` setting, else `<models_dir>/<model>`. It holds one
        snapshot folder per revision."""
        return self.model_dirs.get(model) or f"{self.models_dir}/{model}"

    def model_snapshot(self, model: str, commit: str) -> str:
        """One revision of a model: `<model dir>/<commit12>/`, its files under their original
        names as links to their blobs (never changed once complete)."""
        return f"{self.model_dir(model)}/{snapshot_id(commit)}"

    def model_file(self, model: str, commit: str, name: str) -> str:
        return f"{self.model_snapshot(model, commit)}/{name}"

    @property
    def server_unit_files(self) -> tuple[str, ...]:
        return server_unit_files(self.service_inputs_dir)

    # --- services ---
    # A profile's unit is rendered to `wanted_unit`; only the proof step installs it as the
    # systemd unit, and keeps the last unit that passed its proof as `proven_unit`, so that a
    # change failing its proof is rolled back to it.
    def wanted_unit(self, profile: str) -> str:
        return f"{self.service_inputs_dir}/{service_name(profile)}"

    def proven_unit(self, profile: str) -> str:
        return f"{self.service_inputs_dir}/{service_name(profile)}.proven"

    def service_inputs(self, profile: str) -> str:
        """Digest of what the running service was started and proven with."""
        return f"{self.service_inputs_dir}/{_stem(profile)}.inputs"

    def failed_inputs(self, profile: str) -> str:
        """Digest of inputs that failed their proof, then why: not tried again until they
        change (or `services_retry_failed`)."""
        return f"{self.service_inputs_dir}/{_stem(profile)}.failed"

    def proof_report(self, profile: str) -> str:
        """What the last proof of the service found (JSON)."""
        return f"{self.service_inputs_dir}/{_stem(profile)}.proof.json"

    def key_file(self, profile: str) -> str:
        """Root-only file holding the profile's API key (a systemd credential of its unit)."""
        return f"{SECRETS_DIR}/{_stem(profile)}.key"

    @property
    def rig_dirs(self) -> tuple[str, ...]:
        """The folders every rig gets before anything else, root's and world-readable (the
        rendered units are written into the state folders without creating them)."""
        return (self.garage_root, self.bin_dir, self.state_dir, self.service_inputs_dir,
                self.models_dir)

    @property
    def engine_dirs(self) -> tuple[str, ...]:
        """The folders engine builds need."""
        return (self.src_dir, self.builds_dir, self.ccache_dir)
