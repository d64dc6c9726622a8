"""Everything that runs as root on a GPU host: the loop, reconcile, access and killing,
violations, the local socket server and doctor."""
