"""One plan per capability: facts of the rig in, a plan out, before any operation is added.

A plan is pure data (frozen dataclasses); the tasks hand it to our operations, which decide
again from the rig's state when they run. Planning problems raise `PlanError` with every
problem of the host, so nothing changes on any host."""
