"""diffunlearn: remove training datapoints from a trained diffusion model without retraining it."""

from .data import ImageSet, load_data, resolve_forget, split_kept
from .data.arrays import ImageArray
from .data.labels import unlearning_labels
from .errors import UserError
from .methods import METHODS, Method, MethodSpec, make_method
from .model import DiffusionModel, load_model, save_model
from .model.sampling import ddpm_sample
from .trainer import TrainerConfig, unlearn
from .verification import Status, Verification, verify, write_report
from .verification.loop import UntilRemoved

__version__ = "0.1.0"
__all__ = ["DiffusionModel", "ImageArray", "ImageSet", "METHODS", "Method", "MethodSpec", "TrainerConfig",
           "Status", "UntilRemoved", "UserError", "Verification",
           "ddpm_sample", "load_data", "load_model", "make_method", "resolve_forget", "save_model", "split_kept",
           "unlearn", "unlearning_labels", "verify", "write_report"]
