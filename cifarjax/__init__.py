"""cifarjax: train and fine-tune CIFAR-10 classifiers in pure-functional JAX/Flax."""
__version__ = "0.1.0"
