import os

# Tests never touch the network: the HuggingFace hub is unreachable on CI machines.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
