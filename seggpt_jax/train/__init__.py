"""Training: fine-tuning and in-context prompt tuning with optax."""
