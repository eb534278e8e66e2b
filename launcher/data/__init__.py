"""The data path: the sampling plan and order (`plan`), device-side image transforms (`transforms`), where
batches come from (`sources`: in memory on the device, or a DataLoader), token windows (`windows`) and image
folders (`image_folder`); torchvision's downloadable datasets with clear messages when their files are
missing, cannot be downloaded or are damaged (`torchvision_data`)."""

from launcher.data.plan import TrainPlan, epoch_order, mix_seed
from launcher.data.sources import EvalData, Source, TrainData, to_device, to_tensors
from launcher.data.torchvision_data import torchvision_datasets
from launcher.data.transforms import DeviceTransform
from launcher.data.windows import Windows

__all__ = [
    "DeviceTransform",
    "EvalData",
    "Source",
    "TrainData",
    "TrainPlan",
    "Windows",
    "epoch_order",
    "mix_seed",
    "to_device",
    "to_tensors",
    "torchvision_datasets",
]
