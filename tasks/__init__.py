"""One module per capability; each exposes pyinfra @deploy functions that read a `Rig`."""
