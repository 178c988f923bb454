"""rekd: hyperparameter search for spiking neural networks trained by reverse knowledge distillation."""

__version__ = "0.1.0"
