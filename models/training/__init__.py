"""Training-to-model tooling (the `train` extra). Never imported by the daemon.

Only the modules that need torch/ultralytics import them, and only inside functions that run
after :func:`models.training.ultra_env.prepare` has made ultralytics safe to use offline.
"""
