"""Datasets and loaders."""
from fastmix.data.datasets import (DATASETS, FASHION_MNIST_DIR, ArrayDataset, DatasetError,
                                   load_cifar, load_dataset, load_fashion_mnist, make_synthetic)
from fastmix.data.loader import TensorLoader

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "ArrayDataset", "DatasetError", "TensorLoader",
           "load_cifar", "load_dataset", "load_fashion_mnist", "make_synthetic"]
