"""What cifarjax does only for the CPU: faster formulations (passed in by the builders) and process settings."""
