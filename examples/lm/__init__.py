"""A byte-level language model trained with MuonClip, from one device to a pod slice."""
