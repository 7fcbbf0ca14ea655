"""pretrain-operator's trainer: torchrun entry point (`python -m pretrain_trainer`)."""

__version__ = "0.1.0"
