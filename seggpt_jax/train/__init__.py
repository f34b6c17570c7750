"""Training: fine-tuning (:class:`Trainer`) and in-context prompt tuning (:func:`tune_prompt`) with optax."""

from .prompt_tuning import LearnedPrompt, PromptTuningConfig, resume_prompt_tuning, tune_prompt
from .trainer import EpisodeBatches, Trainer, TrainConfig

__all__ = ["EpisodeBatches", "LearnedPrompt", "PromptTuningConfig", "Trainer", "TrainConfig", "resume_prompt_tuning",
           "tune_prompt"]
