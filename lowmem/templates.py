"""LLaMA-Factory's chat templates (the recipe key ``template``): how a conversation becomes token ids and labels.

A template is a list of *slots* per role: strings with a ``{{content}}`` placeholder, and ``BOS`` / ``EOS`` (the
tokenizer's ids). As in LLaMA-Factory, each string slot is tokenized on its own (``add_special_tokens=False``), the
prefix and the system text go on the first turn only, a turn is (user prompt, assistant response), prompt tokens are
not trained on (label -100), and ``cutoff_len`` is shared between a turn's prompt and response by ``infer_seqlen``.
The formats are the templates' published ones (``docs/llamafactory.md`` lists them); ``replace_eos`` templates make
their end-of-turn token the tokenizer's end-of-text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE = -100
#: Slots standing for the tokenizer's begin / end-of-text ids (compared by value: templates travel to worker processes).
BOS, EOS = "{{bos_token}}", "{{eos_token}}"
#: The empty reasoning block a ReasoningTemplate (qwen3) puts before a response that has none (and trains on).
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class Template:
    user: tuple
    assistant: tuple
    system: tuple = ("{{content}}",)
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    replace_eos: bool = False
    #: LLaMA-Factory's Llama2Template (llama2, mistral, gemma): the system text goes inside the first user message.
    system_in_user: bool = False
    #: LLaMA-Factory's ReasoningTemplate: a response without a <think> block gets an empty one.
    reasoning: bool = False


_QWEN = dict(user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
             assistant=("{{content}}<|im_end|>\n",), system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
             stop_words=("<|im_end|>",), replace_eos=True)

TEMPLATES = {
    "llama3": Template(
        user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",),
        assistant=("{{content}}<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
        prefix=(BOS,), stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True),
    "qwen": Template(**_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": Template(**_QWEN, reasoning=True),
    "qwen3_nothink": Template(**_QWEN),
    "chatml": Template(**{**_QWEN, "stop_words": ("<|im_end|>", "<|im_start|>")}),
    "mistral": Template(user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS),
                        system=("{{content}}\n\n",), prefix=(BOS,), system_in_user=True),
    "gemma": Template(user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
                      assistant=("{{content}}<end_of_turn>\n",), system=("{{content}}\n\n",), prefix=(BOS,),
                      stop_words=("<end_of_turn>",), replace_eos=True, system_in_user=True),
    "llama2": Template(user=(BOS, "[INST] {{content}} [/INST]"), assistant=("{{content}}", EOS),
                       system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",), system_in_user=True),
    "alpaca": Template(user=("### Instruction:\n{{content}}\n\n### Response:\n",),
                       assistant=("{{content}}", EOS, "\n\n"),
                       default_system="Below is an instruction that describes a task. Write a response that "
                                      "appropriately completes the request.\n\n"),
    "default": Template(user=("Human: {{content}}", EOS, "\nAssistant:"), assistant=("{{content}}", EOS, "\n"),
                        system=("System: {{content}}", EOS, "\n")),
    "empty": Template(user=("{{content}}",), assistant=("{{content}}",)),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r} is not available; use one of {', '.join(sorted(TEMPLATES))}, or leave "
                         "template out to use the tokenizer's own chat template")
    return TEMPLATES[name]


def fix_tokenizer(template: Template, tokenizer) -> None:
    """As LLaMA-Factory: a ``replace_eos`` template's first stop word becomes the end-of-text token, the other stop
    words special tokens, and a missing pad token the end-of-text one (tokens it adds grow the model's embeddings:
    ``train.prepare``)."""
    stop_words = list(template.stop_words)
    if template.replace_eos and stop_words:
        tokenizer.add_special_tokens({"eos_token": stop_words.pop(0)})
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if stop_words:
        tokenizer.add_tokens(stop_words, special_tokens=True)


def _ids(slots, content: str, tokenizer) -> list[int]:
    ids = []
    for slot in slots:
        if slot in (BOS, EOS):
            token = tokenizer.bos_token_id if slot == BOS else tokenizer.eos_token_id
            ids += [] if token is None else [token]  # Qwen has no BOS: the slot is dropped
        elif slot:
            text = slot.replace("{{content}}", content, 1)
            ids += tokenizer.encode(text, add_special_tokens=False) if text else []
    return ids


def _has_thought(content: str) -> bool:
    return "<think>" in content or "</think>" in content


def _without_thought(content: str) -> str:
    """``content`` with its ``<think>`` block removed (LLaMA-Factory's ``remove_thought``)."""
    return re.sub(r"<think>\n(.*?)\n</think>\n\n", "", content, flags=re.DOTALL).lstrip("\n")


def encode_turns(template: Template, messages: list[dict], tokenizer,
                 mask_history: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per turn of ``messages`` (an optional leading system message, then user and
    assistant messages alternating, ending with an assistant one). A reasoning template with ``mask_history`` drops
    the earlier answers' ``<think>`` blocks and gives only the last answer an empty one, as LLaMA-Factory does."""
    system = template.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"] or template.default_system, messages[1:]
    roles = [m["role"] for m in messages]
    if len(roles) < 2 or len(roles) % 2 or roles[0::2] != ["user"] * (len(roles) // 2) \
            or roles[1::2] != ["assistant"] * (len(roles) // 2):
        raise ValueError(f"a conversation must alternate user and assistant messages, got roles {roles}")
    turns = []
    for i in range(0, len(messages), 2):
        prompt = _ids(template.prefix, "", tokenizer) if i == 0 else []
        user = messages[i]["content"]
        if i == 0 and system:
            if template.system_in_user:
                user = template.system[0].replace("{{content}}", system, 1) + user
            else:
                prompt += _ids(template.system, system, tokenizer)
        prompt += _ids(template.user, user, tokenizer)
        answer, last = messages[i + 1]["content"], i + 2 == len(messages)
        if template.reasoning and mask_history and not last:
            answer = _without_thought(answer)
        response = _ids(template.assistant, answer, tokenizer)
        if template.reasoning and not _has_thought(answer) and (last or not mask_history):
            response = tokenizer.encode(EMPTY_THOUGHT, add_special_tokens=False) + response
        turns.append((prompt, response))
    return turns


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of ``cutoff_len`` tokens between a turn's prompt and response."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def encode_example(template: Template, messages: list[dict], tokenizer, cutoff_len: int,
                   train_on_prompt: bool = False, mask_history: bool = False) -> dict:
    """``input_ids`` and ``labels`` of a conversation, truncated to ``cutoff_len`` turn by turn as LLaMA-Factory
    does (``mask_history``: only the last turn is trained, and it is kept first)."""
    turns = encode_turns(template, messages, tokenizer, mask_history)
    if mask_history:
        turns = turns[::-1]
    input_ids, labels, total = [], [], 0
    for index, (source, target) in enumerate(turns):
        if total >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        source_labels = source if train_on_prompt else [IGNORE] * source_len
        target_labels = [IGNORE] * target_len if mask_history and index else target
        if mask_history:
            input_ids, labels = source + target + input_ids, source_labels + target_labels + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_labels + target_labels
    return {"input_ids": input_ids, "labels": labels}
