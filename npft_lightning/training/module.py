"""``NPFTModule``: a Hugging Face causal LM with PEFT LoRA adapters, as a LightningModule.

The module owns the loss, the optimizer and validation perplexity. What NPFT adds (outlier
selection, noise, fake-quant validation) lives in callbacks, which reach the model through the
helpers here (:meth:`NPFTModule.decoder_linears`, :meth:`NPFTModule.lora_deltas`,
:meth:`NPFTModule.dataset_nll`).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import lightning.pytorch as pl
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torchmetrics import SumMetric
from tqdm.auto import tqdm

from npft_lightning.core.interrupt import check as stop_if_interrupted
from npft_lightning.core.layers import canonical_name, decoder_linears
from npft_lightning.core.perplexity import causal_lm_nll, perplexity
from npft_lightning.npft.distill import DistillTarget
from npft_lightning.training.lr_schedule import lr_scheduler


class LoraDeltas(Mapping[str, Tensor]):
    """Canonical name -> ``B @ A * scaling`` of the active adapters: what merging adds to that base weight.

    Each update is computed when it is read (under ``no_grad``), not all at once: the merged-weight noise and the
    fake-quant passes visit one matrix at a time, and holding every update would add a full copy of the decoder's
    weights to peak memory (28 GB in float32 for a 7B model). Read an entry once per use.
    """

    def __init__(self, model: nn.Module):
        self._layers: dict[str, list[tuple[LoraLayer, str]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        self._layers.setdefault(canonical_name(name), []).append((module, adapter))

    @torch.no_grad()
    def __getitem__(self, name: str) -> Tensor:
        total = None
        for module, adapter in self._layers[name]:
            delta = module.get_delta_weight(adapter)
            total = delta if total is None else total + delta
        return total

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """A torch seed from (seed, epoch, batch in epoch, rank), hashed so nearby tuples give unrelated streams."""
    digest = hashlib.sha256(f"npft-batch:{int(seed)}:{int(epoch)}:{int(batch_idx)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class NPFTModule(pl.LightningModule):
    """LoRA fine-tuning with full next-token loss and GPTQ-protocol validation perplexity.

    Args:
        model: a Hugging Face causal LM (its weights stay frozen).
        lora: the PEFT ``LoraConfig`` (``target_modules`` already resolved).
        optimizer: a partial optimizer (``params`` missing), e.g. ``AdamW(lr=5e-5, weight_decay=0.01)``.
        warmup_steps, lr_decay: the learning-rate schedule (:func:`~npft_lightning.training.lr_schedule.lr_scheduler`),
            stepped per optimizer step.
        seed: seeds torch's global RNG at every training batch (dropout), see :meth:`on_train_batch_start`.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass
            (HF non-reentrant checkpointing): activation memory of one layer instead of all, ~30 % more compute.
    """

    def __init__(
        self,
        model: nn.Module,
        lora: LoraConfig,
        optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.AdamW, lr=5e-5, weight_decay=0.01),
        warmup_steps: int = 0,
        lr_decay: str = "linear",
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if gradient_checkpointing:
            # Non-reentrant: gradients reach the adapters although the embeddings are frozen (no
            # enable_input_require_grads needed), and DDP sees each adapter gradient once (PEFT #301).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False  # a KV cache is useless in training and incompatible with recomputation
        self.model: PeftModel = get_peft_model(model, lora)
        self.seed = seed
        # Loaders hand over models in eval mode; Lightning keeps each submodule's mode, so set it here
        # (LoRA dropout must be active in training; validation switches to eval and back).
        self.model.train()
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.lr_decay = lr_decay
        # Only the adapters are saved, so resuming must accept a state dict without the frozen base.
        self.strict_loading = False
        self.val_nll = SumMetric().set_dtype(torch.float64)
        self.val_tokens = SumMetric().set_dtype(torch.float64)
        self.val_ppl: float | None = None  # the last validation PPL, in float64
        # Filled by the OutlierSelection callback; read by the noise callback and curvature probes.
        self.outlier_masks: dict[str, Tensor] = {}
        # Set by the noise callback for a perturbed step that distils (noise.distill); read once by training_step.
        self.distill_target: DistillTarget | None = None

    # ----------------------------------------------------------------------------- model access
    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits

    def decoder_linears(self) -> dict[str, nn.Linear]:
        """Canonical name -> frozen base ``nn.Linear`` of every decoder-block linear layer."""
        return decoder_linears(self.model)

    def lora_deltas(self) -> LoraDeltas:
        """Canonical name -> ``B @ A * scaling``: what merging the adapters adds to each base weight (computed per
        matrix when read)."""
        return LoraDeltas(self.model)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the bare base model (used while the adapters are merged into the base weights)."""
        with self.model.disable_adapter():
            yield

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor, adapters: bool = True) -> Tensor:
        """Next-token logits of the model as its weights are now, with its adapters (``adapters``) or without,
        in eval mode (no dropout) and without gradient: a distillation teacher."""
        was_training = self.model.training
        self.model.eval()
        try:
            with nullcontext() if adapters else self.adapters_disabled():
                return self(input_ids.to(self.device))
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def dataset_nll(self, batches: Iterable[Tensor], desc: str | None = None) -> tuple[float, int]:
        """Summed NLL and token count over ``batches``, summed over all DDP ranks.

        ``desc`` shows a progress bar (rank 0 only): these passes run outside Lightning's loops.
        """
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        show = desc is not None and (self._trainer is None or self.trainer.is_global_zero)
        for input_ids in tqdm(batches, desc=desc, leave=False, disable=not show):
            stop_if_interrupted()
            input_ids = input_ids.to(self.device)
            nll, n = causal_lm_nll(self(input_ids), input_ids)
            total += nll
            count += n
        self.model.train(was_training)
        if self._trainer is not None and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return float(total), int(count)

    # ----------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        # Dropout (LoRA's and the base model's) draws from torch's global RNG, whose state a Lightning
        # checkpoint does not hold. Seeding it per batch from (seed, epoch, batch) makes a run resumed
        # from any checkpoint draw the same masks as the uninterrupted run; ranks get distinct streams.
        torch.manual_seed(batch_seed(self.seed, self.trainer.current_epoch, batch_idx, self.global_rank))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        output = self.model(input_ids=batch, labels=batch)
        loss = output.loss
        target, self.distill_target = self.distill_target, None
        if target is not None:  # a perturbed step that distils towards the clean teacher
            loss, kl = target.loss(loss, output.logits)
            # Straight to the loggers: a value self.log'ged on some steps only is repeated by Lightning on the later ones.
            for logger in self.loggers:
                logger.log_metrics({"train/kl": float(kl.detach())}, step=self.global_step)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch.size(0))
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        stop_if_interrupted()  # Lightning's own loop acts on SIGTERM only, and only between batches
        nll, count = causal_lm_nll(self(batch), batch)
        self.val_nll.update(nll)
        self.val_tokens.update(count)

    def setup(self, stage: str) -> None:
        # The epoch-level values logged here and by the fake-quant callback are already global (summed
        # across ranks before the division), so Lightning's "use sync_dist=True" advice does not apply.
        warnings.filterwarnings("ignore", message=r".*self\.log\('val/.*sync_dist=True.*")

    def on_validation_epoch_end(self) -> None:
        # SumMetric.compute() all-reduces across ranks: PPL = exp(Σ NLL / Σ tokens), never a mean of means.
        nll, tokens = float(self.val_nll.compute()), int(self.val_tokens.compute())
        self.val_nll.reset()
        self.val_tokens.reset()
        # Kept as a Python float: the logged copy is a float32 tensor.
        self.val_ppl = perplexity(nll, tokens)
        self.log("val/loss", nll / max(tokens, 1), sync_dist=False)
        self.log("val/ppl", self.val_ppl, prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = lr_scheduler(optimizer, total, warmup_steps=self.warmup_steps, decay=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- checkpoints
    def adapter_mismatch(self, state_dict: Mapping[str, Tensor]) -> str | None:
        """How a checkpoint's ``state_dict`` differs from this module's adapters (None when it fits): resuming
        loads it non-strictly (the frozen base is not saved), which would skip missing adapters silently."""
        trainable = {name: tuple(p.shape) for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(trainable) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(trainable))
        reshaped = sorted(n for n in set(trainable) & set(state_dict) if tuple(state_dict[n].shape) != trainable[n])
        if not (missing or unexpected or reshaped):
            return None
        example = (f"{reshaped[0]} is {list(state_dict[reshaped[0]].shape)} there, {list(trainable[reshaped[0]])} here"
                   if reshaped else f"e.g. {(missing or unexpected)[0]}")
        return (f"{len(missing)} adapter tensors missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape "
                f"({example})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep only what cannot be rebuilt: the adapters (the frozen base is reloaded from the model config).
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
