"""Using what pretraining learned: frozen embeddings (embed.py), linear probes with their baselines
(probe.py) and fine-tuning (finetune.py)."""
