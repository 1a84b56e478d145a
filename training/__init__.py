"""loragate training: LoRA/QLoRA fine-tuning with PEFT + TRL, evaluation, and publishing into the registry."""
