"""Our operations: each decides from facts and says why it does nothing."""

from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS


def connector_arguments(host) -> dict:
    """The running operation's connector arguments (`_sudo`, `_env`, ...), for the commands
    its function commands run themselves with `host.run_shell_command`."""
    arguments = host.current_op_global_arguments or {}
    return {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments}
