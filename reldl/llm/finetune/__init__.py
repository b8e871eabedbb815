"""Fine-tuning an LLM from a table with offloaded optimizer state (issue 8; Fuyou, arXiv 2403.06504).

`CREATE MODEL tuned OPTIONS (model_type = 'llm', base = 'm', finetune = 'full' | 'lora', ...) AS SELECT prompt,
completion FROM examples` trains a copy of a registered LLM on the completions (prompt tokens masked) and registers
the result as an ordinary checkpoint directory, so `llm_generate(..., model := 'tuned')` runs it on the normal Engine.

- `data.py`: tokenization like the engine's (prompt with the tokenizer's specials, completion without, then EOS),
  deterministic per-epoch shuffling from the seed, right-padded batches with the prompt masked.
- `adam.py`: `OffloadedAdam`: fp32 master weights and Adam moments in CPU memory or memory-mapped files, updated by
  `torch.optim.Adam` (one per parameter) on a CPU worker thread as each gradient arrives, overlapped with the rest
  of the backward pass; checkpointable state.
- `trainer.py`: `Trainer`: the layer-by-layer forward / recomputing backward over the family math of
  `reldl/llm/offload/layers.py` (one decoder layer's weights at a time), working weights in bf16/fp16 on the GPU
  (resident or streamed per layer under a memory budget), per-parameter gradient hooks that ship each gradient to
  the CPU as soon as it is ready, activation checkpoints kept on the GPU or swapped to pinned CPU memory, LoRA,
  atomic checkpoints with bit-identical resume, export of the trained weights as a checkpoint.
- `sql.py`: the CREATE MODEL route (options, one-line errors, loss log in `reldl.training_log`).

Importing this package loads nothing heavy.
"""
