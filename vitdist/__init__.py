"""vitdist: distributed Vision Transformer pretraining on WebDataset shards."""
