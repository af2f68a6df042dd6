"""cifarjax: train and fine-tune CIFAR-10 classifiers in pure-functional JAX/Flax.

Importing it changes nothing in the process: the CPU's process-wide settings are a command's, at its start
(`cifarjax.cpu.process`)."""

__version__ = "0.1.0"
