"""A causal LM whose training loss never materializes the logits: ``patch_linear_cross_entropy(model)``.

The patched LLaMA / Qwen2 / Mistral model, given ``labels``, runs its decoder, then computes transformers'
``ForCausalLMLoss`` (labels shifted by one, ``ignore_index`` -100, the sum divided by ``num_items_in_batch`` when the
Trainer passes it under gradient accumulation, the mean otherwise; an fp32 loss) with ``linear_cross_entropy`` on
the last hidden states and the ``lm_head`` weight, and returns ``logits=None``. Without labels, and wherever the
shortcut would change the result, it runs the model's own forward unchanged:

* in eval mode: evaluation and prediction keep their logits (``compute_metrics``, ``predict``), and hold no
  activations for backward, so the logits are the smaller cost there;
* ``logits_to_keep`` other than 0 (generation: the loss then is whatever transformers makes of it);
* an ``lm_head`` whose forward is replaced or hooked while the model runs (MeZO's perturbed forwards, accelerate's
  device hooks): reading its weight directly would skip what the hook does, so the logits are computed (warned).

With ``return_dict=False`` the tuple has no logits entry (transformers' ``to_tuple`` drops ``None``), so what
follows the loss moves up one place; read outputs by name. The patch replaces ``forward`` on the instance only
(other models of the class are untouched), and finds the transformers model inside a peft wrapper. It refuses what
it cannot reproduce: another architecture, an ``lm_head`` that is not a bias-free ``nn.Linear`` (LoRA or
quantization on the head), final logit softcapping, a custom ``loss_function``. Tied embeddings need nothing
special: the head's weight is the embedding's.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from .linear_ce import linear_cross_entropy

#: The causal LMs whose forward the patch reproduces (transformers class names).
SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
#: Their configs' ``model_type`` (what the planner reads to price the patched loss by default).
LINEAR_CE_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _supported_classes() -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, name) for name in SUPPORTED)


def causal_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` from the hidden states and the head's weight instead of the logits: the
    fp32 mean over the tokens whose next label is not ignored, or their sum divided by ``num_items_in_batch``."""
    if shift_labels is None:  # token t predicts label t + 1; the last one predicts nothing
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden_states.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden_states, weight, shift_labels, ignore_index=ignore_index, reduction=reduction,
                                loss_dtype=torch.float32)
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (a peft model's base model, or ``model`` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _head_problem(head: nn.Module) -> str | None:
    """Why the head's weight cannot stand for the head (None when it can)."""
    if type(head) is not nn.Linear:
        return (f"lm_head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear (a LoRA "
                "adapter, modules_to_save or quantization on the head?)")
    if head.bias is not None:
        return "lm_head has a bias, which the loss does not add"
    if not head.weight.is_floating_point():
        return f"lm_head's weight is {head.weight.dtype}, not a floating-point matrix"
    return None


def _hooked(head: nn.Module) -> bool:
    """Whether something runs around or instead of the head's forward (MeZO's perturbation, accelerate's hooks)."""
    return "forward" in head.__dict__ or bool(head._forward_hooks) or bool(head._forward_pre_hooks)


def check_supported(model: nn.Module) -> None:
    """Raise a ValueError naming the problem and the fix when the patch cannot reproduce ``model``'s loss."""
    classes = _supported_classes()
    name = type(model).__name__
    if not isinstance(model, classes):
        raise ValueError(f"linear_cross_entropy patches {', '.join(SUPPORTED)} (or a peft model around one); "
                         f"{name} is not one of them. Set linear_cross_entropy=False for it.")
    if type(model).forward not in {cls.forward for cls in classes}:
        raise ValueError(f"{name} overrides its forward, which the patch would replace; patch its parent class's "
                         "model instead, or set linear_cross_entropy=False.")
    config = model.config
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"{name}: final_logit_softcapping={config.final_logit_softcapping} squashes the logits, which "
                         "linear_cross_entropy does not; set linear_cross_entropy=False.")
    problem = _head_problem(model.get_output_embeddings())
    if problem:
        raise ValueError(f"{name}: {problem}. Keep the head a plain bias-free nn.Linear (e.g. leave lm_head out of "
                         "LoRA's target_modules and modules_to_save), or set linear_cross_entropy=False.")
    from transformers.loss.loss_utils import ForCausalLMLoss

    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(f"{name} has a custom loss_function ({model.loss_function!r}); the patch computes "
                         "transformers' ForCausalLMLoss only. Set linear_cross_entropy=False to keep yours.")


def can_patch(model: nn.Module) -> bool:
    """Whether ``patch_linear_cross_entropy(model)`` would reproduce ``model``'s loss without a warning at each step:
    a supported causal LM (``check_supported``) whose head nothing hooks yet (what the default of lowmem's Trainer
    asks before patching)."""
    lm = find_causal_lm(model)
    try:
        check_supported(lm)
    except ValueError:
        return False
    return not _hooked(lm.get_output_embeddings()) and "forward" not in lm.__dict__


def is_patched(model: nn.Module) -> bool:
    """Whether ``model``'s causal LM runs the patched forward."""
    forward = find_causal_lm(model).__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _patched_forward


def patch_linear_cross_entropy(model: nn.Module) -> nn.Module:
    """Make ``model`` (a LLaMA / Qwen2 / Mistral causal LM, or a peft model around one) compute its loss with
    ``linear_cross_entropy`` when given labels (see the module docstring). Idempotent; returns ``model``."""
    lm = find_causal_lm(model)
    if is_patched(lm):
        return model
    check_supported(lm)
    if "forward" in lm.__dict__:
        raise ValueError(f"{type(lm).__name__}.forward is already replaced on this model (by accelerate, or another "
                         "patch): apply patch_linear_cross_entropy first.")
    lm.forward = types.MethodType(_patched_forward, lm)
    return model


def unpatch_linear_cross_entropy(model: nn.Module) -> nn.Module:
    """Undo ``patch_linear_cross_entropy``: the model's own forward again. Returns ``model``."""
    if is_patched(model):
        del find_causal_lm(model).forward
    return model


def _patched_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                     inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """The model's forward, its loss from ``linear_cross_entropy`` when given labels (``logits=None`` then)."""
    arguments = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
    original = type(self).forward
    if labels is None or not self.training or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return original(self, labels=labels, logits_to_keep=logits_to_keep, **arguments, **kwargs)
    head = self.get_output_embeddings()
    problem = _head_problem(head) or ("lm_head's forward is replaced or hooked" if _hooked(head) else None)
    if problem:
        warnings.warn(f"linear_cross_entropy: {problem}, so {type(self).__name__} computes its logits for this "
                      "loss (no memory saved).", RuntimeWarning, stacklevel=2)
        return original(self, labels=labels, **arguments, **kwargs)
    return _loss_forward(self, head.weight, labels, arguments, kwargs)


def _loss_forward(model: nn.Module, weight: torch.Tensor, labels: torch.Tensor, arguments: dict, kwargs: dict):
    """The decoder, then the loss from its last hidden states; ``return_dict=False`` gives the tuple, as in the
    model's own forward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    outputs = model.model(**arguments, **kwargs)
    loss = causal_lm_loss(outputs.last_hidden_state, weight, labels, **kwargs)
    result = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return result if return_dict else result.to_tuple()
