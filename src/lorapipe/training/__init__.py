"""The train stage's parts, one concern a module; `lorapipe.train` runs them in order.

- `batches`: the plan of a run, the batch order of an epoch, each sample's random draws, the
  batch tensors (`make_batch`) and the loss (`diffusion_loss`) — pure functions of the seed;
- `prepare`: device and precision, the model parts with their LoRA, optimizer and LR schedule;
- `compiling`: torch.compile warm-up on every batch shape and the guarded first step;
- `checkpoints`: the one owner of the checkpoint and step-export folder layout, save/restore;
- `report`: metrics records, progress lines, the loss plot and the summary.
"""
