"""Distributed training: job spec, model, data, mixed precision, checkpoints, the loop, Ray Train.

spec            TrainingJob, the YAML a user writes
data            the stdlib corpus: byte tokens, held-out split by file, job-wide data position
model           TransformerLM with a KV cache for batched generation
precision       fp32 / bf16 / fp16 on a device: autocast and the loss scaler
checkpoint      atomic checkpoint directories, keep-last-K, the latest complete one
metrics         JSONL records and the loss-curve PNG
training_loop   the per-worker core (plain PyTorch) and run_bare (plain processes)
train           the Ray Train V2 wrapper, `python -m jobs.train JOB.yaml`
"""
