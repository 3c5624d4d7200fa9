"""`pocketlm train`: two-phase pretraining, SFT and DPO for Phi-3 models, one CPU to many GPUs, exact resume.

Modules: `config` (TrainConfig + named recipes), `loop` (Trainer, train), `distributed` (torchrun, FSDP2),
`checkpoint` (atomic checkpoints), `sft` (chat packing and assistant-only loss), `dpo` (sigmoid DPO),
`metrics` (progress, JSONL, TensorBoard, MFU, loss plot), `commands` (the CLI verb).
"""
