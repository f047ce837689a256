"""Data path: label spaces (labels/), raw dataset layouts (sources.py), conversion and shard writing (convert.py,
make_shards.py, shards.py), synthetic scenes (synthetic.py); reading: shard specs and indexes (index.py), one shard
URL as samples through WebDataset (reader.py), the plan of who reads what (plan.py), the resumable stream and its
DataLoader (stream.py), fault reporting (faults.py), image samples (transforms.py, loader.py), token shards
(tokens.py)."""
