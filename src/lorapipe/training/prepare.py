"""Set-up of a run before its first step: device and precision, the base model's parts with a
LoRA on the UNet (and on the text encoder when it is trained), the optimizer and LR schedule.

Order matters for exact resume and for bytes: global RNG is seeded with the run's seed just
before the UNet's LoRA is initialised (gaussian A); the text encoder's LoRA is initialised after
it, from the same stream.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from ..config import RunConfig


def resolve_precision(setting: str, device: str) -> str:
    """``auto`` → bf16 on a GPU that supports it, else fp16 on GPU; ``no`` on CPU (bit-exact)."""
    import torch

    if setting != "auto":
        return setting
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def resolve_compile(setting, device: str) -> bool:
    """``auto`` compiles on a GPU only (on a CPU compiling costs more than it saves)."""
    return device == "cuda" if setting == "auto" else bool(setting)


def resolve_prefetch(setting, device: str, cache) -> bool:
    """``auto`` makes batches ahead with CUDA or when the latent cache is streamed; on a CPU
    with the cache in memory the thread only competes with training for the cores."""
    if setting == "auto":
        return device == "cuda" or not getattr(cache, "in_memory", True)
    return bool(setting)


def check_optimizer(run: RunConfig, device: str) -> None:
    """Fail before training starts when the optimizer cannot run here (one line, naming the key)."""
    if run.optimizer != "adamw8bit":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA setup raising at import
        raise ValueError(
            f"runs.{run.name}.optimizer: adamw8bit needs bitsandbytes, which does not import "
            f"({type(e).__name__}: {e}); install it (CUDA only) or use optimizer: adamw"
        ) from None
    if device != "cuda":
        raise ValueError(
            f"runs.{run.name}.optimizer: adamw8bit needs a CUDA GPU (device here: {device}); "
            "use optimizer: adamw"
        )


def make_optimizer(run: RunConfig, params: list):
    """AdamW over the LoRA parameters: torch's, or bitsandbytes' 8-bit one (`check_optimizer`).

    ``params``: a list of tensors, or param groups (dicts) when the text encoder is trained."""
    import torch

    cls = torch.optim.AdamW
    if run.optimizer == "adamw8bit":
        import bitsandbytes

        cls = bitsandbytes.optim.AdamW8bit
    return cls(
        params,
        lr=run.learning_rate,
        betas=(run.adam_beta1, run.adam_beta2),
        weight_decay=run.weight_decay,
        eps=run.adam_epsilon,
    )


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: str):
    """GPU determinism for the duration of a run (restored afterwards): deterministic algorithms
    (ops without a deterministic kernel raise), cuBLAS workspace config, no cuDNN autotuning,
    math SDPA. On CPU training is bit-exact already, so nothing changes there."""
    if not enabled or device != "cuda":
        yield
        return
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # read by cuBLAS when its handle is created: before the first CUDA matmul of the process
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]


@dataclass
class Device:
    """Where and in which precision a process trains."""

    kind: str  # "cuda" | "cpu"
    torch_device: object
    precision: str  # "no" | "bf16" | "fp16"
    amp_dtype: object  # torch dtype of autocast, or None

    def autocast(self):
        import torch

        enabled = self.amp_dtype is not None
        return torch.autocast(self.kind, dtype=self.amp_dtype or torch.float32, enabled=enabled)


def training_device(run: RunConfig, local_rank: int = 0) -> Device:
    """The device and precision of this process; errors for settings that cannot run here."""
    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    precision = resolve_precision(run.mixed_precision, kind)
    if precision == "fp16" and kind == "cpu":
        raise ValueError(f"runs.{run.name}.mixed_precision: fp16 needs a GPU; use bf16 or no")
    check_optimizer(run, kind)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return Device(kind, dev, precision, amp)


def cast_frozen(module, dtype) -> None:
    """Frozen weights of ``module`` in ``dtype`` (the AMP dtype); trainable (LoRA master)
    weights stay fp32. The one cast for the UNet and text encoders alike."""
    if dtype is None:
        return
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def attach_lora(module, cfg, device: Device, gradient_checkpointing: bool = False) -> list:
    """Freeze ``module``, add the LoRA ``cfg`` (its init draws from global RNG), cast the
    frozen weights, move it to the device in train mode; returns the LoRA parameters."""
    module.requires_grad_(False)
    module.add_adapter(cfg)
    if gradient_checkpointing:
        module.enable_gradient_checkpointing()
    cast_frozen(module, device.amp_dtype)
    module.to(device.torch_device).train()
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class Model:
    """The trained modules of a run and what they are trained with."""

    unet: object
    scheduler: object  # the base model's DDPM noise schedule
    scaling: float  # VAE latent scaling factor
    lora_cfg: object  # the UNet's peft LoraConfig
    text_parts: dict = field(default_factory=dict)  # loaded text parts (text encoder trained)
    text_cfg: object = None  # the text encoders' LoraConfig, or None
    params: list = field(default_factory=list)  # every LoRA parameter (clip, all-reduce)
    param_groups: list = field(default_factory=list)  # what the optimizer gets

    @property
    def trains_text(self) -> bool:
        return self.text_cfg is not None


def prediction_type(run: RunConfig, scheduler) -> str:
    """The base model's prediction type; an error for one lorapipe cannot train."""
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"run {run.name}: the base model's scheduler has prediction_type {prediction!r}; "
            "lorapipe trains epsilon or v_prediction models only"
        )
    return prediction


def build_model(run: RunConfig, family, parts: dict, device: Device) -> Model:
    """The UNet with its LoRA (and the text encoders' LoRA when ``train_text_encoder``), from
    the loaded ``parts``; the optimizer's param groups (the first text encoder at
    ``text_encoder_lr``, SDXL's second at ``text_encoder_2_lr``)."""
    import torch

    from ..models import lora_config, vae_scaling_factor

    unet = parts["unet"]
    torch.manual_seed(run.seed)  # global RNG: LoRA init (gaussian A); dropout reseeds per step
    cfg = lora_config(run.lora_rank, run.lora_alpha, run.target_modules, run.lora_dropout)
    params = attach_lora(unet, cfg, device, run.gradient_checkpointing)
    m = Model(unet, parts["scheduler"], vae_scaling_factor(parts["vae"]), cfg, params=params)
    m.param_groups = params
    if run.train_text_encoder:  # after the UNet's LoRA: its init draws from global RNG after it
        m.text_parts = {k: parts[k] for k in family.text_parts}
        m.text_cfg = lora_config(
            run.lora_rank, run.lora_alpha, family.text_lora_targets, run.lora_dropout
        )
        te_lr = run.text_encoder_lr if run.text_encoder_lr is not None else run.learning_rate
        te2_lr = run.text_encoder_2_lr if run.text_encoder_2_lr is not None else te_lr
        m.param_groups = [{"params": params, "lr": run.learning_rate}]
        te_params = []
        for i, te in enumerate(family.text_encoders(parts)):  # one group (and rate) each
            mine = attach_lora(te, m.text_cfg, device)
            m.param_groups.append({"params": mine, "lr": te_lr if i == 0 else te2_lr})
            te_params += mine
        m.params = params + te_params  # clipping, all-reduce and broadcast cover all
    return m


def make_schedule(run: RunConfig, opt, total_steps: int):
    """The LR schedule (diffusers' ``get_scheduler``) over ``total_steps``."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        run.lr_scheduler,
        optimizer=opt,
        num_warmup_steps=run.warmup_steps,
        num_training_steps=total_steps,
    )
