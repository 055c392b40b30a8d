"""Sans-IO Serval core: identifiers, wire codec, service table, flow state machine.

Nothing in this package touches sockets, clocks or global randomness: the current time
(`now`, seconds as a float) and a `random.Random` are passed in by the caller.
"""
