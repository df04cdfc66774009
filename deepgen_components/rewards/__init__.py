"""Reward models for MR-GRPO."""
