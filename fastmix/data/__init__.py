"""Datasets and loaders."""
from fastmix.data.datasets import (DATASETS, FASHION_MNIST_DIR, ArrayDataset, DatasetError,
                                   load_cifar, load_dataset, load_fashion_mnist, make_synthetic)
from fastmix.data.imagefolder import (DaliLoader, TorchvisionLoader, build_imagefolder_loader,
                                      scan_imagefolder)
from fastmix.data.loader import TensorLoader

__all__ = ["DaliLoader", "TorchvisionLoader", "build_imagefolder_loader", "scan_imagefolder", "DATASETS", "FASHION_MNIST_DIR", "ArrayDataset", "DatasetError", "TensorLoader",
           "load_cifar", "load_dataset", "load_fashion_mnist", "make_synthetic"]
