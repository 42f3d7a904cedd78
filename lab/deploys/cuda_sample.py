"""Test deploy: the real CUDA toolkit compiling a sample of the deploy's own CUDA build.

It runs what deploy.py runs up to the builds (the rig-side scripts and folders, the engine
plan with every check, the build tools, the pinned toolkit installed from the wheel index),
then, instead of building llama-server (30 to 60 minutes of CUDA on 2 cores), garage-build
with the plan's own command line and --configure-only, and in that configured folder only
the sample objects, with make and the environment garage-build compiles in (the toolkit's
bin/ first in PATH, the deploy's ccache). What a user's deploy builds is untouched.

Host data: the rig's settings, as for deploy.py, with one engine. Environment:
GARAGE_CUDA_SAMPLE_OBJECTS, the make targets under ggml/src/ggml-cuda to compile, separated
by spaces (e.g. "softmax.o"). make's verbose log, every nvcc command line in it, goes to
<build_dir>/sample.log. Each step runs only while what it makes is missing (the build
folder's CMakeCache.txt, the objects), so a second run changes nothing.
"""

import os
import shlex

from pyinfra import host
from pyinfra.facts.files import File
from pyinfra.operations import server

from llm_garage.fleet import rig_for
from llm_garage.operations.engine import build_command
from tasks import base, engines

CUDA_DIR = "ggml/src/ggml-cuda"

rig = rig_for(host)
objects = os.environ.get("GARAGE_CUDA_SAMPLE_OBJECTS", "").split()
base.prepare(rig)
(plan,) = engines.prepare(rig)

argv = shlex.split(build_command(plan, rig.layout.script("garage-build")).get_raw_value())
argv.insert(argv.index("--"), "--configure-only")
environment = {"CCACHE_DIR": plan.ccache_dir, "CCACHE_BASEDIR": plan.ccache_base,
               "CCACHE_NOHASHDIR": "1"}
path_env = f'PATH={shlex.quote(plan.nvcc.rsplit("/", 1)[0])}:"$PATH"' if plan.nvcc else ""
compiled = [f"{plan.build_dir}/{CUDA_DIR}/CMakeFiles/ggml-cuda.dir/{o.removesuffix('.o')}.cu.o"
            for o in objects]
if not host.get_fact(File, path=f"{plan.build_dir}/CMakeCache.txt"):
    server.shell(name=f"Configure {plan.engine} ({plan.key}) with the deploy's flags",
                 commands=[shlex.join(argv)])
if not all(host.get_fact(File, path=path) for path in compiled):
    server.shell(
        name=f"Compile {', '.join(objects)} in {plan.build_dir}",
        commands=[f"cd {shlex.quote(f'{plan.build_dir}/{CUDA_DIR}')} && "
                  f"{path_env} {' '.join(f'{k}={shlex.quote(v)}' for k, v in environment.items())} "
                  f"make VERBOSE=1 {' '.join(shlex.quote(o) for o in objects)} "
                  f"> {shlex.quote(plan.build_dir + '/sample.log')} 2>&1 "
                  f"|| {{ tail -n 60 {shlex.quote(plan.build_dir + '/sample.log')}; exit 1; }}"])
