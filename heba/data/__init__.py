"""Data readers by layout family (torchvision roots, ImageFolder, split files, generated demo)."""
