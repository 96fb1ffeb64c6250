"""Predict before launching: memory per rank (memory.py, activations.py), the devices it must fit (devices.py)."""
