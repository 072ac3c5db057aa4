"""Experiment entry points (one module per MLflow Project entry point)."""
