"""Data for training. `pocketlm.data.shards`: the token shard format (memory-mapped uint16/uint32 ids with a JSON
index), its atomic writer and the resumable mixture loader that `pocketlm train` reads. The data pipeline
(readers, filters, dedup, synthetic data) builds on that format."""
