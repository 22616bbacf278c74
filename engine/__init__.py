"""Training and evaluation engine: config loading, the IoU metric, distributed helpers,
atomic checkpoints, the poly LR schedule and the episode loop shared by train.py and test.py."""
