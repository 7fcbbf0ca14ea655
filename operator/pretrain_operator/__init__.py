"""pretrain-operator: reconciles PretrainJobs into gangs of torchrun pods. Never imports torch."""

__version__ = "0.1.0"
