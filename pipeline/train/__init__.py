"""Stage two's machinery: the config, model setup, the Trainer subclass, student batches, LoRA."""
