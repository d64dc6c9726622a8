"""`gpulocker install` / `uninstall`: what a production GPU server needs, written in one go
(SPEC section 14). `plan` decides what to write and run, `files` writes it (no links followed),
`units` renders the sandboxed systemd units, `tls` makes the self-signed certificate."""
