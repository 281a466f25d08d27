"""Evaluation: reward-model metrics, judges and win rates."""
