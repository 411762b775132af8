"""The shared training loop: a model learns multiple-choice answers by minimising an objective over its
option scores, with checkpoints it resumes from bit for bit, and is exported.

Part of the core, beneath the stages: teacher preparation (the label stage) fine-tunes the teacher with it
on gold answers, and the train stage distils students with it (its objective: kdflow.train.losses).

Modules: recipe (the loop, top to bottom) with the pieces it calls: objective (the LossParts an objective
returns, the cross-entropy against gold answers), batches (tokenized examples, data order), optim
(optimizer, schedule, step budget), val_check (validation accuracy, early stopping), reporting (progress,
metric rows), numerics (autocast, subnormals), checkpoints (resumable checkpoints), distributed (what
several processes share), export (writing the trained model); inputs (what training reads from the store:
the questions of a split, a finished model's directory, a tokenizer for models built from scratch).
"""
