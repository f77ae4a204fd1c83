"""Planning a deployment before you have it (`expertmesh plan`, docs/planning.md).

routing_sources.py  where routing comes from: recorded traces or synthetic Zipf router scores, the model's own gate
replay.py           routed tokens through the dispatcher's own plan: tokens, pairs and bytes per device and step
hardware.py         hardware rates (deploy/hardware/*.yaml, or measured), validated naming the field
cost_model.py       the time of a decode step from what its dispatch sends, at those rates
local_step.py       the step on the machine at hand from calibrated rates: gateway, round trips, merged passes
plan.py             every candidate (D, top-M, R) replayed and priced; the table, JSON and plot
calibrate.py        `plan --calibrate`: this machine's matmul, memory, transport, expert and gateway rates
command.py          the `plan` subcommand: its arguments and its handler
"""
