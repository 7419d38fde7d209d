"""Differentiable rewards (HPSv2.1, PickScore, ...) and their preprocessing."""
