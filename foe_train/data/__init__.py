"""Data: tokenizers, dataset preparation (foe-prepare-data, the default corpus) and the
deterministic, token-sharded batches the trainer consumes."""
