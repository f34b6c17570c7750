"""Training: fine-tuning (:class:`Trainer`) and in-context prompt tuning (:func:`tune_prompt`) with optax."""

from .prompt_tuning import LearnedPrompt, PromptTuningConfig, resume_prompt_tuning, tune_prompt
from .trainer import EpisodeBatches, MemoryEstimate, Trainer, TrainConfig, estimate_memory

__all__ = ["EpisodeBatches", "LearnedPrompt", "MemoryEstimate", "PromptTuningConfig", "Trainer", "TrainConfig",
           "estimate_memory", "resume_prompt_tuning", "tune_prompt"]
