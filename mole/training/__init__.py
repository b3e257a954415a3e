"""Training: arguments, optimizer and schedule, the loop."""

from mole.training.args import TrainArgs
from mole.training.loop import NonFiniteLossError, TrainState, train

__all__ = ["NonFiniteLossError", "TrainArgs", "TrainState", "train"]
