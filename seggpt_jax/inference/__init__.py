"""Inference: prompts, the Segmenter API and the video procedure."""
