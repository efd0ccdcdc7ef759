"""Evaluation: retrieval recalls, caption metrics, classification accuracy."""
