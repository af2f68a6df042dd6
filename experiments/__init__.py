"""The experiment commands: `python -m experiments.NAME`. Started that way, one relaunches itself with huge pages
for its buffers first (`cifarjax.hugepages`)."""
from cifarjax.hugepages import relaunch_command

relaunch_command(__name__)
