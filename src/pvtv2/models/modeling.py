"""PVTv2 models: the encoder, ``PvtV2Model``, ``PvtV2ForImageClassification`` and ``PvtV2Backbone``.

Only these top-level classes read the config; the layers below them take plain numbers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import fast
from .config import STAGE_LISTS, PvtV2Config, check_problem_type
from .layers import PvtV2Stage, init_weights
from .outputs import BackboneOutput, BaseModelOutput, ImageClassifierOutput

__all__ = [
    "PvtV2PreTrainedModel",
    "PvtV2Encoder",
    "PvtV2Model",
    "PvtV2ForImageClassification",
    "PvtV2Backbone",
    "check_pixel_values",
    "check_input_size",
    "classification_loss",
    "host_checkable_labels",
    "resolve_output_flags",
]

logger = logging.getLogger(__name__)


def _as_dtype(name: str, value: torch.dtype | str | None) -> torch.dtype | str | None:
    if value is None or value == "auto" or isinstance(value, torch.dtype) and value.is_floating_point:
        return value  # "auto": the checkpoint's own dtype, resolved when it is read
    found = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"{name}={value!r} is not a floating-point torch dtype (torch.float16, 'bfloat16'...)")
    return found


def _load_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """The dtype ``from_pretrained`` casts to, from transformers' spellings. ``torch_dtype`` used to be kept as a
    config field: the model stayed float32 without a word, and its config.json said otherwise."""
    wanted, former = _as_dtype("dtype", dtype), _as_dtype("torch_dtype", torch_dtype)
    if wanted is not None and former is not None and wanted != former:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass dtype alone")
    return wanted or former


def check_pixel_values(pixel_values: Any, num_channels: int, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error unless ``pixel_values`` is a float tensor of shape (B, num_channels, H, W) and, when
    ``dtype`` (the weights' dtype) is given, of that dtype.

    A dtype other than the weights' fails deep inside (a convolution or matmul error that names neither the input
    nor the fix), so it is caught here: float64 from NumPy, float16 into a float32 model, integers from an image.
    Under autocast for the input's device the mixed dtypes are autocast's to reconcile, and are let through.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have 4 dimensions (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        weights = f" of the model's dtype {dtype}" if dtype is not None else ""
        raise TypeError(
            f"pixel_values must be a floating-point tensor{weights}, got {pixel_values.dtype}; preprocess images with "
            f"PvtV2ImageProcessor (rescale and normalise)"
        )
    if dtype is not None and pixel_values.dtype != dtype:
        if not torch.is_autocast_enabled(pixel_values.device.type):
            raise TypeError(
                f"pixel_values is {pixel_values.dtype} but the model's weights are {dtype}: cast the input with "
                f"pixel_values.to({dtype}) (or the model with model.to({pixel_values.dtype}), or run under "
                f"torch.autocast)"
            )
        if torch.float64 in (pixel_values.dtype, dtype):
            # Autocast casts no float64 tensor: a float64 input (or model) met the other's autocast-cast weights (or
            # input) in the first convolution, which failed there ("Input type (double) and bias type (c10::BFloat16)
            # should be the same"), as in transformers and timm.
            raise TypeError(
                f"pixel_values is {pixel_values.dtype} but the model's weights are {dtype}, and autocast leaves "
                f"float64 tensors as they are: cast the input with pixel_values.to({dtype})"
            )
    if pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channels (shape {tuple(pixel_values.shape)}) but the model "
            f"expects {num_channels}"
        )
    if pixel_values.shape[0] == 0 or pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
        raise ValueError(f"pixel_values is empty: shape {tuple(pixel_values.shape)}")


def check_input_size(height: int, width: int, config: PvtV2Config) -> None:
    """Raise a clear error when a spatial-reduction convolution would be larger than its stage's token grid."""
    for i, (patch, stride, sr, depth) in enumerate(zip(config.patch_sizes, config.strides, config.sr_ratios, config.depths)):
        height = (height + 2 * (patch // 2) - patch) // stride + 1
        width = (width + 2 * (patch // 2) - patch) // stride + 1
        # a stage of no blocks has no reduction convolution: its ratio limits nothing
        reduces = not config.linear_attention and sr > 1 and depth > 0
        if height < 1 or width < 1 or (reduces and min(height, width) < sr):
            raise ValueError(
                f"the input is too small for this model: stage {i + 1} would see a {max(height, 0)}x{max(width, 0)} "
                f"token grid, smaller than its spatial-reduction ratio {sr}; use larger images"
            )


class PvtV2PreTrainedModel(nn.Module):
    """Common ground of the PVTv2 models: construction from a config, weights in and out, gradient checkpointing."""

    config_class = PvtV2Config
    main_input_name = "pixel_values"
    # As transformers' PreTrainedModel: the attribute holding the encoder in task models (``base_model``), and
    # gradient checkpointing supported (:meth:`gradient_checkpointing_enable`).
    base_model_prefix = "pvt_v2"
    supports_gradient_checkpointing = True
    # What loading a checkpoint needs to know about the class (pvtv2.weights.loading reads these):
    encoder_prefix: str = ""  # where the encoder's ``encoder.`` keys sit in state_dict() ("pvt_v2." inside task models)
    head_prefixes: tuple[str, ...] = ()  # the top-level names of the task head(s), which a checkpoint may lack
    classifier_prefix: str | None = None  # the head's class-sized last layer, replaced when num_labels differs
    in_transformers: bool = False  # transformers has this class: save_pretrained warns where it would compute otherwise

    def __init__(self, config: PvtV2Config) -> None:
        super().__init__()
        if not isinstance(config, PvtV2Config):
            raise TypeError(f"config must be a PvtV2Config, got {type(config).__name__}")
        # The config checks its lists when built; a field set afterwards (config.num_encoder_blocks = 2) is not
        # checked, and a model built from the lists would contradict its own count (transformers builds from it).
        stages = config.num_encoder_blocks
        for name in STAGE_LISTS:
            value = getattr(config, name)
            if len(value) != stages:
                raise ValueError(
                    f"the config's num_encoder_blocks is {stages!r} but {name} has {len(value)} entries (changed after "
                    f"the config was built?): make the config with every per-stage list at once, "
                    f"config.replace(num_encoder_blocks=..., depths=..., ...)"
                )
        self.config = config

    def post_init(self) -> None:
        """Initialise every module once: those of a PVTv2 model nested inside this one initialised themselves."""
        done: set[int] = set()
        for sub in self.modules():
            if sub is not self and isinstance(sub, PvtV2PreTrainedModel):
                done.update(id(m) for m in sub.modules())
        for module in self.modules():
            if id(module) not in done:
                init_weights(module, self.config.initializer_range, recurse=False)

    # ------------------------------------------------------------------ weights in and out
    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        ignore_mismatched_sizes: bool | None = None,
        output_loading_info: bool = False,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        weights_only: bool = True,
        device_map: Any = None,
        low_cpu_mem_usage: bool | None = None,
        trust_remote_code: bool | None = None,
        **config_overrides: Any,
    ):
        """Load weights from a ``save_pretrained`` folder, a checkpoint file (transformers, timm or the original
        authors' layout) or a hub id (its ``revision``, its ``subfolder``, ``local_files_only``: from the cache only,
        ``token``: for a private repository, as transformers takes them); other keyword
        arguments override config fields (``num_labels`` replaces the head). ``dtype`` (or ``torch_dtype``, its
        former name in transformers) is a floating-point torch dtype or its name (``"bfloat16"``), or ``"auto"``:
        the dtype its config.json names, else that of its weights as stored (without a dtype: float32).

        transformers' loading arguments, with its meaning:

        - ``ignore_mismatched_sizes``: True leaves every tensor whose shape differs from the model's newly
          initialised (a warning names them); False refuses any, the classifier's too. Left out, only the class-sized
          layers are replaced (when ``num_labels`` differs), with a warning.
        - ``output_loading_info``: returns ``(model, info)``, info with transformers' keys: ``missing_keys``,
          ``unexpected_keys`` (sets of names), ``mismatched_keys`` (a set of ``(name, checkpoint shape, model
          shape)``), ``error_msgs`` (a list).
        - ``variant``: reads ``model.<variant>.safetensors`` (sharded: ``model.safetensors.index.<variant>.json``;
          or ``pytorch_model.<variant>.bin``) in a folder or hub repository.
        - ``use_safetensors``: True reads safetensors files only, False the PyTorch ``.bin`` only (read with
          ``torch.load(weights_only=True)``, as every pickled file here).
        - ``weights_only``: True only (the default); False, which would unpickle code, is refused.
        - ``device_map``: one device (a name, ``torch.device``, an index, a dict placing everything on one device, or
          "auto" where there is at most one GPU), as ``device``; a map over several devices is refused.
        - ``low_cpu_mem_usage`` and ``trust_remote_code`` are accepted and change nothing: the model is always built
          without memory before the weights are read, and no code from a repository is ever run."""
        from ..weights.loading import load_device, load_pretrained

        dtype = _load_dtype(dtype, torch_dtype)
        device = load_device(device, device_map)
        for name, value in (("low_cpu_mem_usage", low_cpu_mem_usage), ("trust_remote_code", trust_remote_code)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True, False or None, got {value!r}")

        loaded = load_pretrained(
            cls, source, revision=revision, cache_dir=cache_dir, subfolder=subfolder, local_files_only=local_files_only,
            token=token, dtype=dtype, ignore_mismatched_sizes=ignore_mismatched_sizes,
            output_loading_info=output_loading_info, variant=variant, use_safetensors=use_safetensors,
            weights_only=weights_only, **config_overrides
        )
        model, info = loaded if output_loading_info else (loaded, None)
        if device is not None:
            model = model.to(device=device)
        return (model.eval(), info) if output_loading_info else model.eval()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_function: Any = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        safe_serialization: bool = True,
        variant: str | None = None,
        token: str | bool | None = None,
    ) -> None:
        """Write ``config.json`` and the weights (transformers' layout) into ``save_directory``, taking
        transformers' arguments by the same names:

        - ``safe_serialization``: True, ``model.safetensors``; False, ``pytorch_model.bin`` (a plain dict of tensors,
          ``torch.save``; read back with ``weights_only=True``).
        - ``is_main_process``: False writes nothing (distributed training: the main process saves).
        - ``state_dict``: written instead of the model's, as given (names to tensors; anything else is refused; a
          warning names the keys and shapes that do not fit the model).
        - ``max_shard_size`` (bytes, or "5GB", "500MB", "10KB"; default "50GB" as transformers 5): larger weights
          are split into ``model-00001-of-0000N.safetensors`` (``pytorch_model-...bin``) and an ``.index.json``; a
          tensor over the limit gets a shard of its own.
        - ``variant``: the weights are written under transformers' names for it, ``model.<variant>.safetensors``
          (shards ``model.<variant>-00001-of-0000N.safetensors`` and ``model.safetensors.index.<variant>.json``;
          ``pytorch_model.<variant>.bin`` unsafe), beside the other variants' files; ``from_pretrained(...,
          variant=...)`` reads them.

        Weight files of an earlier save of the same variant in another form (``model.safetensors`` beside a new
        ``pytorch_model.bin``, shards of another count, their index) are removed once the new ones are written; no
        other file is touched.

        Each file is replaced atomically, the weights before ``config.json``. ``push_to_hub=True`` is refused (no
        upload here); ``token`` is accepted and unused (it is for the upload); ``save_function``
        (``accelerator.save``, ``torch.save``) is accepted and not called: the files are written by pvtv2's atomic
        writer. Any other keyword is a TypeError naming it."""
        from ..weights.loading import save_pretrained

        save_pretrained(
            self, save_directory, is_main_process=is_main_process, state_dict=state_dict, save_function=save_function,
            push_to_hub=push_to_hub, max_shard_size=max_shard_size, safe_serialization=safe_serialization,
            variant=variant, token=token,
        )

    def init_new_module(self, module: nn.Module) -> None:
        """Initialise a module that a checkpoint did not provide (a new head); called by ``from_pretrained``."""
        init_weights(module, self.config.initializer_range)

    # ------------------------------------------------------------------ conveniences
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (training only).

        ``gradient_checkpointing_kwargs``: passed to ``torch.utils.checkpoint.checkpoint``, as transformers' method
        (and its Trainer's ``gradient_checkpointing_kwargs``) takes them; ``use_reentrant`` defaults to False (as
        transformers 5; transformers 4 took True): the same gradients, without the reentrant variant's need for an
        input that requires grad. ``every_n_layers``: only every n-th stage recomputes (stages 0, n, 2n, ...: the
        layers transformers counts for PVTv2), the others keep their activations. ``offload``: the activations kept
        for the recomputation are held in host memory (``torch.autograd.graph.save_on_cpu``; nothing to do for a
        model on the CPU). transformers 5 names this method ``activation_checkpointing_enable``: both are here."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        allowed = {"use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"gradient_checkpointing_kwargs: {', '.join(map(repr, unknown))} not taken by "
                f"torch.utils.checkpoint.checkpoint (it takes {', '.join(sorted(allowed))})"
            )
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a whole number >= 1 (1: every stage), got {every_n_layers!r}")
        kwargs.setdefault("use_reentrant", False)
        stages = [m for m in self.modules() if isinstance(m, PvtV2Stage)]
        for index, module in enumerate(stages):
            module.gradient_checkpointing = index % every_n_layers == 0
            module.checkpoint_kwargs = kwargs
            module.checkpoint_offload = bool(offload)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (the same arguments)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, PvtV2Stage):
                module.gradient_checkpointing = False

    def activation_checkpointing_disable(self) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_disable`."""
        self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any stage recomputes its blocks in training (transformers' property of the same name)."""
        return any(isinstance(m, PvtV2Stage) and m.gradient_checkpointing for m in self.modules())

    @property
    def is_activation_checkpointing(self) -> bool:
        """transformers 5's name for :attr:`is_gradient_checkpointing`."""
        return self.is_gradient_checkpointing

    @property
    def base_model(self) -> nn.Module:
        """The encoder of a task model (its ``pvt_v2``), the model itself otherwise, as transformers answers."""
        return getattr(self, self.base_model_prefix, self)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers, with ``return_buffers``), as transformers counts them."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    def num_parameters(
        self, only_trainable: bool = False, exclude_embeddings: bool = False, *, trainable_only: bool | None = None
    ) -> int:
        """Parameters of the model, as transformers counts them: ``only_trainable``, those that require gradients;
        ``exclude_embeddings``, without those of ``nn.Embedding`` layers (a PVTv2 encoder has none).
        ``trainable_only`` is this method's former name for ``only_trainable``."""
        flags = {"only_trainable": only_trainable, "exclude_embeddings": exclude_embeddings}
        if trainable_only is not None:
            flags["trainable_only"] = trainable_only
        for name, value in flags.items():
            # a string "False" is true to Python: counted only the trainable ones without a word
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"num_parameters: {name} must be True or False, got {value!r}")
        if trainable_only is not None and only_trainable and not trainable_only:
            raise ValueError(f"num_parameters: only_trainable={only_trainable!r} and trainable_only={trainable_only!r} "
                             f"disagree (trainable_only is the former name of only_trainable); pass only_trainable")
        only = only_trainable or bool(trainable_only)
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if (p.requires_grad or not only) and id(p) not in skip)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class PvtV2Encoder(nn.Module):
    """The pyramid of stages (the "Mix Transformer" of the literature)."""

    def __init__(self, config: PvtV2Config) -> None:
        super().__init__()
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks of all stages.
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(config.depths):
            self.layers.append(
                PvtV2Stage(
                    in_channels=config.num_channels if i == 0 else config.hidden_sizes[i - 1],
                    dim=config.hidden_sizes[i],
                    depth=depth,
                    patch_size=config.patch_sizes[i],
                    stride=config.strides[i],
                    num_heads=config.num_attention_heads[i],
                    mlp_ratio=config.mlp_ratios[i],
                    sr_ratio=config.sr_ratios[i],
                    linear=config.linear_attention,
                    qkv_bias=config.qkv_bias,
                    act=config.hidden_act,
                    drop=config.hidden_dropout_prob,
                    attn_drop=config.attention_probs_dropout_prob,
                    drop_path=rates[start : start + depth],
                    norm_eps=config.layer_norm_eps,
                    patch_norm_eps=config.patch_norm_eps,
                    reduction_norm_eps=config.reduction_norm_eps,
                )
            )
            start += depth

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_stages: int | None = None,
    ) -> BaseModelOutput:
        """Run the first ``num_stages`` stages (all by default)."""
        hidden_states = []
        attentions = []
        x = pixel_values
        for i, stage in enumerate(self.layers[:num_stages]):
            # A later stage's input: contiguous under autocast where ATen's own kernel convolves (transformers'
            # layout, fast.reference_conv_input), else the previous stage's channels-last view.
            x, probs = stage(fast.reference_conv_input(x) if i else x, output_attentions)  # (B, C_i, H_i, W_i)
            if output_hidden_states:
                hidden_states.append(x)
            attentions.append(tuple(probs))
        return BaseModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


def resolve_output_flags(config: PvtV2Config, output_attentions, output_hidden_states, return_dict) -> tuple[bool, bool, bool]:
    return (
        config.output_attentions if output_attentions is None else output_attentions,
        config.output_hidden_states if output_hidden_states is None else output_hidden_states,
        config.return_dict if return_dict is None else return_dict,
    )


class PvtV2Model(PvtV2PreTrainedModel):
    """The bare encoder: ``last_hidden_state`` is the last stage's (B, C, H, W) map."""

    in_transformers = True

    def __init__(self, config: PvtV2Config) -> None:
        super().__init__(config)
        self.encoder = PvtV2Encoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        output_attentions, output_hidden_states, return_dict = resolve_output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        # The dtype the input meets first: the first patch embedding's convolution.
        check_pixel_values(pixel_values, self.config.num_channels, self.encoder.layers[0].patch_embedding.proj.weight.dtype)
        check_input_size(pixel_values.shape[-2], pixel_values.shape[-1], self.config)
        out = self.encoder(pixel_values, output_attentions, output_hidden_states)
        return out if return_dict else out.to_tuple()


class PvtV2ForImageClassification(PvtV2PreTrainedModel):
    """The encoder, global average pooling of the last stage, and a linear classifier."""

    encoder_prefix = "pvt_v2."
    head_prefixes = ("classifier.",)
    classifier_prefix = "classifier."
    in_transformers = True

    def __init__(self, config: PvtV2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pvt_v2 = PvtV2Model(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        output_attentions, output_hidden_states, return_dict = resolve_output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self.pvt_v2(pixel_values, output_attentions, output_hidden_states, return_dict=True)
        pooled = out.last_hidden_state.mean(dim=(-2, -1))  # (B, C)
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        result = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


def host_checkable_labels(labels: torch.Tensor) -> bool:
    """Whether a loss may check the values of ``labels`` on the host: CPU labels, outside torch.compile, not batched
    by torch.func's vmap (a data-dependent check fails there)."""
    return (
        labels.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(labels)
    )


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: PvtV2Config) -> torch.Tensor:
    """Cross-entropy, BCE-with-logits or MSE, by ``config.problem_type`` (inferred as transformers does when unset)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    check_problem_type(problem, num_labels)  # a problem_type set after the config was built went unchecked
    # The class range is checked on labels that arrive on the CPU, before they move: on a GPU the check would stall
    # every step (three host syncs), and cross_entropy's own device-side check stops bad labels there.
    # Not under torch.compile either: a data-dependent check splits the graph (cross_entropy checks the range too).
    # Nor for labels batched by torch.func's vmap (per-sample losses and gradients), which cannot be indexed by a mask:
    # cross_entropy's own check still raises there.
    host = labels if host_checkable_labels(labels) else None
    labels = labels.to(logits.device)
    if problem == "regression":
        if labels.numel() != logits.numel():
            raise ValueError(f"regression labels have {labels.numel()} values for logits of shape {tuple(logits.shape)}")
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.reshape(logits.shape).to(logits.dtype))
    if problem == "single_label_classification":
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"single-label classification needs integer class indices, got labels of dtype {labels.dtype}")
        labels = labels.reshape(-1)
        if labels.numel() != logits.shape[0]:
            raise ValueError(f"got {labels.numel()} labels for a batch of {logits.shape[0]} images")
        if host is not None:
            valid = host.reshape(-1)[host.reshape(-1) != -100]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_labels):
                bad = valid[(valid < 0) | (valid >= num_labels)].unique().tolist()
                raise ValueError(f"labels {bad} are out of range for {num_labels} classes (valid: 0..{num_labels - 1}, or -100 to ignore)")
        return F.cross_entropy(logits.view(-1, num_labels), labels.long())
    if labels.shape != logits.shape:
        raise ValueError(f"multi-label targets must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class PvtV2Backbone(PvtV2PreTrainedModel):
    """Multi-scale feature maps for dense prediction: the stages named by ``config.out_features`` / ``out_indices``.

    ``channels`` and ``strides`` give each output's channel count and its stride with respect to the input.
    ``output_attentions`` gives every stage's attention maps in the :class:`BackboneOutput`, as ``PvtV2Model`` does
    (transformers' backbone returns none). The tuple form (``return_dict=False``) is transformers': ``(feature_maps,)``
    and ``hidden_states`` after it when asked, never attention maps, so that code indexing it reads the same entries.
    """

    in_transformers = True

    def __init__(self, config: PvtV2Config) -> None:
        super().__init__(config)
        self.encoder = PvtV2Encoder(config)
        self.post_init()

    @property
    def out_features(self) -> list[str]:
        return list(self.config.out_features)

    @out_features.setter
    def out_features(self, value: list[str]) -> None:
        self.config.out_features = value  # the config re-derives out_indices, as transformers' backbones do

    @property
    def out_indices(self) -> list[int]:
        return [i % self.config.num_encoder_blocks for i in self.config.out_indices]

    @out_indices.setter
    def out_indices(self, value: list[int]) -> None:
        self.config.out_indices = value  # the config re-derives out_features

    @property
    def stage_names(self) -> list[str]:
        return self.config.stage_names

    @property
    def num_features(self) -> list[int]:
        return list(self.config.hidden_sizes)

    @property
    def out_feature_channels(self) -> dict[str, int]:
        """Every stage's channel count by name, whether it is an output or not (transformers' attribute)."""
        return dict(zip(self.stage_names, self.config.hidden_sizes))

    @property
    def channels(self) -> list[int]:
        return [self.config.hidden_sizes[i] for i in self.out_indices]

    @property
    def strides(self) -> list[int]:
        return [self.config.stage_strides[i] for i in self.out_indices]

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm-style description of each output: channels, reduction (stride) and name."""
        return [
            dict(num_chs=c, reduction=s, module=n) for c, s, n in zip(self.channels, self.strides, self.out_features)
        ]

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        output_attentions, output_hidden_states, return_dict = resolve_output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        # The dtype the input meets first: the first patch embedding's convolution.
        check_pixel_values(pixel_values, self.config.num_channels, self.encoder.layers[0].patch_embedding.proj.weight.dtype)
        check_input_size(pixel_values.shape[-2], pixel_values.shape[-1], self.config)
        if not self.out_indices:
            raise ValueError("this backbone has no output stage: config.out_features (and out_indices) is empty; "
                             f"name at least one of {self.stage_names}")
        output_attentions = output_attentions and return_dict  # the tuple form has no place for them
        # Stages after the last requested one are skipped unless every stage's output or attention map is asked for.
        needed = None if output_hidden_states or output_attentions else max(self.out_indices) + 1
        out = self.encoder(pixel_values, output_attentions, output_hidden_states=True, num_stages=needed)
        maps = tuple(out.hidden_states[i] for i in self.out_indices)
        if not return_dict:
            return (maps, out.hidden_states) if output_hidden_states else (maps,)
        return BackboneOutput(
            feature_maps=maps,
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions,
        )
