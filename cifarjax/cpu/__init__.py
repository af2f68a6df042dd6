"""Everything cifarjax does only for the CPU: formulations XLA's CPU compiler runs faster (passed in by the builders,
`cifarjax.target`) and a command's process settings (`process`). Imports no model module, and nothing on import."""
