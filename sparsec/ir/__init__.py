"""The graph IR: op set, frozen nodes and programs, builders, verifier, printer and reference interpreter."""
