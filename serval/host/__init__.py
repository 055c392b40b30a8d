"""servald, the per-host Serval daemon (asyncio runtime around the sans-IO core).

SAL over UDP, the TCP data plane (`repair`: connections created and migrated with
TCP_REPAIR; `ports`: client port allocation for them), the control API, router mode, the
netlink monitor and the migration engine. Only this package touches sockets for the stack.
"""
