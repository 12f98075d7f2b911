"""einfuse: an Einsum-cascade compiler and autotuner for JAX/XLA and Pallas."""

__version__ = "0.1.0"
