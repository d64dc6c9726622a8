"""GPULocker: fair, enforced sharing of a lab server's GPUs."""

__version__ = "0.1.0"
