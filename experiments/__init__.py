"""The experiment commands: `python -m experiments.NAME`. Importing them changes nothing in the process; started
as a command, one applies its process-wide settings first (`experiments.common.launch`)."""
