"""cifarjax: train and fine-tune CIFAR-10 classifiers in pure-functional JAX/Flax."""
from cifarjax.xla_flags import add_cpu_flags

__version__ = "0.1.0"
add_cpu_flags()
