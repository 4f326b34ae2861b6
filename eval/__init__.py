"""Checkpoint evaluation: seen vs held-out accuracy, exposure history, plots, mechanistic analyses."""
