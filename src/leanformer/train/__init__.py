"""Training on transformers.Trainer: task fine-tuning (finetuning), regularised pretraining
(pretrain), healing after pruning (heal); randomized backprop through Linear layers
(randomized_backprop)."""
