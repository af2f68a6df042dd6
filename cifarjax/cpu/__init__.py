"""Everything cifarjax does only for the CPU: formulations XLA's CPU compiler runs faster (`conv`, `dense`,
`fusion`, `optim`, `donation`) and a command's process-wide settings, applied at its start (`xla_flags`,
`hugepages`, `malloc`, `process`); docs/architecture.md tabulates each trick with its measured gain.

The builders pass the formulations in only where a run is built for platform "cpu" (`cifarjax.target`); the
program a GPU gets is plain JAX and contains none of them. Nothing here imports the model modules (shared helpers:
`cifarjax.ops`), and importing this package imports nothing else (a command's start reads it before JAX starts).
"""
