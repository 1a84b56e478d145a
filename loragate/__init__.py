"""loragate: train, register, serve and observe many LoRA adapters on one base model."""

__version__ = "0.1.0"
