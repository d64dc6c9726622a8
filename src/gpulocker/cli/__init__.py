"""The `gpulocker` command: its entry point, the terminal commands, rendering and the client
that reaches the agent's socket or the HTTP API."""
