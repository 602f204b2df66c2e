"""Training: ``python -m luna.training`` (see `luna.training.app`).

- `luna.training.app`: the command, its options, the run directory, stage order;
- `luna.training.stage`: the epoch loop, checkpoints and resume shared by stages;
- `luna.training.classification`: the nodule classifier stage;
- `luna.training.devices`: CPU / GPU / DataParallel / DistributedDataParallel, AMP;
- `luna.training.tensorboard`: what each stage logs.
"""
