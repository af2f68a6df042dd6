"""Everything cifarjax does only for the CPU: formulations XLA's CPU compiler runs faster, and process settings.

The builders pass these in only where a run is built for platform "cpu" (`cifarjax.target`); the program a GPU
gets is plain JAX and contains none of them. Nothing here imports the model modules (shared helpers:
`cifarjax.ops`). docs/architecture.md tabulates each trick with its measured gain.

* `conv`: Winograd/im2col convolutions and the fused conv+ReLU+max-pool blocks, with the CPU-measured thresholds
  (`LARGE_MAP`, `FEW_CHANNELS`, `XLA_FORWARD_WIDTHS`, `F4_FROM`).
* `dense`: the linear layer's kernel gradient through a transposed copy.
* `fusion`: fusion barriers (`materialize`, `apart`), a data-dependent conditional XLA's CPU fusion stops at.
* `optim`: optax's Adam/AdamW/SGD with their moments computed once.
* `donation`: a training step that donates only its frozen parameters.
* `xla_flags`, `hugepages`, `malloc`, `process`: a command's process-wide settings, applied at its start.

Importing this package imports nothing else (a command's start reads it before JAX starts its backend).
"""
