"""Distributed training on Ray Train: job spec, model, data, mixed precision, elastic restart."""
