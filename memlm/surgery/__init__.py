"""Model surgery: structured pruning into a smaller model of the same family (healing: memlm.train.heal)."""
