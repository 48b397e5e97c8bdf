"""Datasets, scenarios and the data that ships with clfast.

``create_dataset(name, split, root, transform, **kw)`` builds any registered dataset; ``list_datasets()``
names them. Shipped with the package (no download): ``synth-pretrain``, ``synth-shapes``, ``synth-vqa``
and ``synth-vqa-pretrain`` (procedural, :mod:`clfast.data.synth`) and ``digits`` (scikit-learn's real
digits). Readers of the standard benchmarks on local disk (:mod:`clfast.data.readers`): ``cifar100``,
``imagenet_r``, ``cub200``, ``domainnet``, ``eurosat``; of the VQA ones (:mod:`clfast.data.vqa_readers`):
``clove-scene``, ``clove-function``, ``vqav2``; ``describe_datasets(root)`` says which are found.
:class:`Scenario` cuts a dataset into continual-learning tasks; :func:`build_transforms` gives the
train/eval image transforms. This package imports nothing else from clfast.
"""

from .registry import DatasetInfo, create_dataset, dataset_info, list_datasets, register_dataset
from . import synth as synth  # noqa: F401  (registers the synth datasets)
from . import digits as digits  # noqa: F401  (registers "digits")
from .synth import SynthClassification, SynthVQA, SynthVQAPretrain
from .vqa import VQARecords
from .digits import Digits
from .class_descriptors import load_descriptors, synth_shapes_descriptors
from . import readers as readers  # noqa: F401  (registers the readers of data on disk)
from . import vqa_readers as vqa_readers  # noqa: F401  (registers clove-scene, clove-function, vqav2)
from .readers import describe_datasets, split_manifest
from .scenario import JointScenario, Scenario, TaskDataset
from .transforms import build_transforms

__all__ = [
    "DatasetInfo", "create_dataset", "dataset_info", "list_datasets", "register_dataset",
    "SynthClassification", "SynthVQA", "SynthVQAPretrain", "VQARecords", "Digits", "load_descriptors", "synth_shapes_descriptors",
    "describe_datasets", "split_manifest", "Scenario", "JointScenario", "TaskDataset", "build_transforms",
]
