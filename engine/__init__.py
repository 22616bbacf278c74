"""Training and evaluation engine: config loading, the IoU metric, distributed helpers,
atomic checkpoints, the poly LR schedule, the episode loop shared by train.py and test.py, and the figures of
test.py --vis."""
