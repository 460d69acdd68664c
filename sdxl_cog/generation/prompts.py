"""Prompt encoding without CLIP's 77-token truncation.

The stock SDXL pipeline silently drops every token past the 75th. Here a prompt is split into
75-token chunks, each wrapped in BOS/EOS and padded to 77 as CLIP was trained, encoded separately and
concatenated along the sequence axis (the UNet's cross-attention accepts any length). A prompt of at
most 75 tokens gives exactly the stock pipeline's embeddings. The pooled embedding, which conditions
the UNet globally, comes from the first chunk as in AUTOMATIC1111.

Length is bounded (config.MAX_PROMPT_TOKENS per prompt): each chunk costs text-encoder memory and
every UNet step's cross-attention, so an unbounded prompt could hold a GPU for hours or exhaust it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPTokenizer, PreTrainedModel

from sdxl_cog.config import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, PROMPT_CHUNK_TOKENS
from sdxl_cog.errors import InputError


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor

    def as_pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))


def _token_ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def check_prompt_lengths(tokenizers: list[CLIPTokenizer], prompt: str, negative_prompt: str) -> int:
    """Refuse a prompt over the budget before any work; returns the longer prompt's length in tokens."""
    longest = 0
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        # Characters first: the tokenizer never sees more than MAX_PROMPT_CHARS (the schema's max_length).
        if len(text) > MAX_PROMPT_CHARS:
            raise InputError(
                f"{name} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} characters and "
                f"{MAX_PROMPT_TOKENS} tokens are accepted: shorten it."
            )
        tokens = max(len(_token_ids(t, text)) for t in tokenizers)
        if tokens > MAX_PROMPT_TOKENS:
            raise InputError(
                f"{name} is {tokens} tokens long; at most {MAX_PROMPT_TOKENS} tokens "
                f"({MAX_PROMPT_TOKENS // PROMPT_CHUNK_TOKENS} chunks of {PROMPT_CHUNK_TOKENS}) are accepted: shorten it."
            )
        longest = max(longest, tokens)
    return longest


def _token_chunks(tokenizer: CLIPTokenizer, text: str) -> list[list[int]]:
    ids = _token_ids(tokenizer, text)
    body = tokenizer.model_max_length - 2  # room left by BOS and EOS
    return [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]


def _chunk_ids(tokenizer: CLIPTokenizer, chunks: list[list[int]], n_chunks: int) -> torch.Tensor:
    width = tokenizer.model_max_length
    chunks = chunks + [[]] * (n_chunks - len(chunks))
    rows = []
    for chunk in chunks:
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (width - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def _encode(encoder: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states of all chunks joined into one sequence, and the first chunk's pooled output."""
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    hidden = out.hidden_states[-2]  # SDXL conditions on the penultimate layer
    return hidden.reshape(1, -1, hidden.shape[-1]), out[0][:1]


@torch.inference_mode()
def encode_prompts(
    tokenizers: list[CLIPTokenizer],
    encoders: list[PreTrainedModel],
    prompt: str,
    negative_prompt: str,
    zero_empty_negative: bool,
) -> PromptEmbeddings:
    """Encode prompt and negative prompt through every (tokenizer, encoder) pair of a pipeline.

    `zero_empty_negative` mirrors the pipeline's `force_zeros_for_empty_prompt`: SDXL base was trained
    with an all-zero unconditional embedding, the refiner with the encoded empty string.
    """
    prompt_chunks = [_token_chunks(t, prompt) for t in tokenizers]
    negative_chunks = [_token_chunks(t, negative_prompt) for t in tokenizers]
    n_chunks = max(len(c) for c in prompt_chunks + negative_chunks)

    def embed(all_chunks: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [_encode(e, _chunk_ids(t, c, n_chunks)) for t, e, c in zip(tokenizers, encoders, all_chunks)]
        # Hidden states of both encoders side by side; the pooled output of the last (OpenCLIP bigG).
        return torch.cat([h for h, _ in encoded], dim=-1), encoded[-1][1]

    prompt_embeds, pooled = embed(prompt_chunks)
    if zero_empty_negative and not negative_prompt:
        negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = embed(negative_chunks)
    return PromptEmbeddings(prompt_embeds, pooled, negative_embeds, negative_pooled)
