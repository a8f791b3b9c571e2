"""Training: typed configs, optimizer, jitted step, Orbax checkpoints and the loop (``train.py``)."""
