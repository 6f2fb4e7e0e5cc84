"""Building blend prompts from token ids, as LMCache's blend example does.

A prompt is ``sys + sep + chunk1 + sep + ... + chunkN + sep + question``,
each piece tokenized on its own without special tokens, ``sep`` the token
ids of LMCACHE_BLEND_SPECIAL_STR.  Tokenizing the pieces separately makes a
chunk's ids identical wherever it appears, which is what lets its stored KV
be found again.
"""

from __future__ import annotations

_MARK = "\x00KVBLEND_USER\x00"


def chat_pieces(tokenizer, system: str) -> tuple[str, str]:
    """Text before and after the user turn of the model's chat template
    (``system`` as the system message); ("", "") for models without one."""
    if not getattr(tokenizer, "chat_template", None):
        return system + "\n", "\n"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": _MARK}],
        tokenize=False, add_generation_prompt=True)
    before, after = text.split(_MARK)
    return before, after


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone, without BOS or other special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def join(sys_ids: list[int], chunk_ids: list[list[int]], question_ids: list[int],
         sep_ids: list[int]) -> list[int]:
    """``sys + sep + c1 + sep + ... + cN + sep + question`` as one id list."""
    ids = list(sys_ids)
    for c in chunk_ids:
        ids += list(sep_ids) + list(c)
    return ids + list(sep_ids) + list(question_ids)
