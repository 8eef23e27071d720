"""`FastTokenizer`: a `tokenizers.Tokenizer` plus tokenizer_config.json, with transformers'
tokenizer API (transformers 5's semantics, pinned against AutoTokenizer in
tests/test_transformers_utils.py). `tokenizer.get_tokenizer` decides when it is exact to use.

NOTE: it implements what pagedllm and its callers use (encode, decode, __call__,
apply_chat_template, special tokens, vocabulary lookups). Other attributes are read from the
transformers tokenizer of the same folder, loaded on first use (slow, but exact); mutating methods
such as `add_tokens` are not mirrored onto the fast path's backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPECIAL_TOKENS_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Texts longer than this are encoded without holding the GIL (see `_encode`).
_GIL_FREE_CHARS = 16384
# Keyword arguments whose behaviour FastTokenizer implements; any other goes to transformers.
_ENCODE_KWARGS = frozenset({"split_special_tokens", "verbose"})


def _added_token(value: Any) -> Any:
    """A tokenizer_config token entry (string or serialized AddedToken) as transformers holds it."""
    from tokenizers import AddedToken

    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k != "__type"}
        return AddedToken(**fields)
    return value


class FastTokenizer:
    """A `tokenizers.Tokenizer` plus tokenizer_config.json, with transformers' tokenizer API."""

    is_fast = True
    padding_side = "right"
    truncation_side = "right"

    def __init__(self, path: str, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        folder = Path(path)
        self.name_or_path = path
        self._config = config
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # NOTE: transformers switches any truncation/padding of tokenizer.json off at each call.
        backend.no_truncation()
        backend.no_padding()
        self._tokenizer = backend
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.split_special_tokens = bool(config.get("split_special_tokens", False))
        max_len = config.get("model_max_length", config.get("max_len"))
        self.model_max_length = int(max_len) if max_len is not None else int(1e30)
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.chat_template = _load_chat_template(folder, config)
        self._hf: Any = None
        self._setup_special_tokens(config)

    # ----- loading -----

    def _setup_special_tokens(self, config: dict[str, Any]) -> None:
        """transformers' TokenizersBackend init: named and extra special tokens, and the added
        tokens of tokenizer_config, are added to the backend where missing."""
        from tokenizers import AddedToken, processors

        added_decoder = {
            int(i): _added_token(t) for i, t in (config.get("added_tokens_decoder") or {}).items()
        }
        added_by_text = {str(t): t for t in added_decoder.values()}
        self._special_attrs = list(SPECIAL_TOKENS_ATTRIBUTES)
        self._special: dict[str, Any] = {}
        for key in SPECIAL_TOKENS_ATTRIBUTES:
            value = config.get(key)
            if value is not None:
                value = _added_token(value)
                self._special[key] = (
                    added_by_text.get(str(value), value) if added_by_text else value
                )
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
        model_specific = {
            k: _added_token(v)
            for k, v in config.items()
            if k not in SPECIAL_TOKENS_ATTRIBUTES
            and k.endswith("_token")
            and isinstance(v, (str, dict))
        }
        if isinstance(extra, Mapping):
            model_specific.update({k: _added_token(v) for k, v in extra.items()})
            extra = []
        self._extra: list[Any] = [_added_token(t) for t in (extra or [])]
        for key, value in model_specific.items():
            self._special_attrs.append(key)
            self._special[key] = value

        to_add = [t for _, t in sorted(added_decoder.items())]
        known = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        known |= {str(t) for t in to_add}
        for value in [*self._special.values(), *self._extra]:
            if str(value) not in known and value not in to_add:
                to_add.append(value)
        if to_add:
            named = {str(v) for v in self._special.values()}
            tokens = []
            for token in to_add:
                if isinstance(token, str):
                    token = AddedToken(token, special=True)
                elif not token.special and str(token) in named:
                    token.special = True
                tokens.append(token)
            self._tokenizer.add_tokens(tokens)
        self._tokenizer.encode_special_tokens = self.split_special_tokens
        if self._tokenizer.post_processor is None:
            # NOTE: what transformers installs then (add_bos_token/add_eos_token are ignored
            # when a tokenizer.json exists): the sequence as is.
            self._tokenizer.post_processor = processors.TemplateProcessing(
                single="$A:0", pair="$A:0 $B:1", special_tokens=[]
            )

    @property
    def hf_tokenizer(self) -> Any:
        """transformers' tokenizer of the same folder (loaded on first use: slow)."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.name_or_path)
        return self._hf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        logger.debug("FastTokenizer.%s comes from the transformers tokenizer", name)
        return getattr(self.hf_tokenizer, name)

    # ----- the backend and the vocabulary -----

    @property
    def backend_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def decoder(self) -> Any:
        return self._tokenizer.decoder

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (as transformers)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=False))

    def __len__(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def __bool__(self) -> bool:
        return True

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tokenizer.get_vocab(with_added_tokens=True))

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return dict(self._tokenizer.get_added_tokens_decoder())

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items())}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> Any:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int | None:
        index = self._tokenizer.token_to_id(token)
        if index is None:
            unk = self._special.get("unk_token")
            return None if unk is None else self._tokenizer.token_to_id(str(unk))
        return int(index)

    def convert_ids_to_tokens(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False
    ) -> Any:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # ----- special tokens -----

    def _special_token(self, key: str) -> str | None:
        value = self._special.get(key)
        return None if value is None else str(value)

    @property
    def bos_token(self) -> str | None:
        return self._special_token("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_token("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_token("unk_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_token("pad_token")

    @property
    def sep_token(self) -> str | None:
        return self._special_token("sep_token")

    @property
    def cls_token(self) -> str | None:
        return self._special_token("cls_token")

    @property
    def mask_token(self) -> str | None:
        return self._special_token("mask_token")

    def _special_id(self, key: str) -> int | None:
        token = self._special_token(key)
        return None if token is None else self._token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def sep_token_id(self) -> int | None:
        return self._special_id("sep_token")

    @property
    def cls_token_id(self) -> int | None:
        return self._special_id("cls_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._special_id("mask_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: str(self._special[k]) for k in self._special_attrs if k in self._special}

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra]

    @property
    def all_special_tokens(self) -> list[str]:
        seen: dict[str, None] = {}
        for key in self._special_attrs:
            if self._special.get(key) is not None:
                seen.setdefault(str(self._special[key]))
        for token in self._extra:
            seen.setdefault(str(token))
        return list(seen)

    @property
    def all_special_ids(self) -> list[int | None]:
        return [self._token_to_id(t) for t in self.all_special_tokens]

    # ----- encoding -----

    def encode(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of `text` (a string); transformers handles anything beyond that."""
        plain = padding is False and truncation in (None, False) and max_length is None
        if not plain or not isinstance(text, str) or set(kwargs) - _ENCODE_KWARGS:
            return list(
                self.hf_tokenizer.encode(
                    text,
                    text_pair,
                    add_special_tokens=add_special_tokens,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    **kwargs,
                )
            )
        if text_pair is not None and not isinstance(text_pair, str):
            raise ValueError("text_pair must be a string")
        return self._encode(text, text_pair, add_special_tokens, kwargs.get("split_special_tokens"))

    def _encode(
        self,
        text: str,
        pair: str | None,
        add_special_tokens: bool,
        split_special_tokens: bool | None,
    ) -> list[int]:
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        backend = self._tokenizer
        if backend.encode_special_tokens != split:
            backend.encode_special_tokens = split
        try:
            if pair is None and len(text) > _GIL_FREE_CHARS:
                # NOTE: encode_batch releases the GIL (encode holds it throughout: 10 s for a
                # 9 MB prompt, with every other thread of the process stopped); same ids.
                (encoding,) = backend.encode_batch([text], add_special_tokens=add_special_tokens)
                return list(encoding.ids)
            return list(backend.encode(text, pair, add_special_tokens=add_special_tokens).ids)
        finally:
            backend.encode_special_tokens = self.split_special_tokens

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False
    ) -> list[str]:
        encoding = self._tokenizer.encode(text, pair, add_special_tokens=add_special_tokens)
        return list(encoding.tokens)

    def __call__(
        self, text: Any, text_pair: Any = None, add_special_tokens: bool = True, **kwargs: Any
    ) -> Any:
        """`{"input_ids", "attention_mask"}` of a string or a list of strings (transformers'
        BatchEncoding for any other argument)."""
        texts = [text] if isinstance(text, str) else text
        simple = (
            text_pair is None
            and not set(kwargs) - {"padding", "truncation"}
            and kwargs.get("padding", False) is False
            and kwargs.get("truncation") in (None, False)
            and isinstance(texts, (list, tuple))
            and all(isinstance(t, str) for t in texts)
        )
        if not simple:
            return self.hf_tokenizer(
                text, text_pair, add_special_tokens=add_special_tokens, **kwargs
            )
        ids = [self._encode(t, None, add_special_tokens, None) for t in texts]
        masks = [[1] * len(x) for x in ids]
        if isinstance(text, str):
            return Encoding(input_ids=ids[0], attention_mask=masks[0])
        return Encoding(input_ids=ids, attention_mask=masks)

    # ----- decoding -----

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Text of `token_ids` (one sequence, or a list of them). `spaces_between_special_tokens`
        is accepted and, as in transformers' fast tokenizers, has no effect."""
        token_ids = _to_list(token_ids)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            return [
                self._decode(s, skip_special_tokens, clean_up_tokenization_spaces)
                for s in token_ids
            ]
        return self._decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        clean = kwargs.get("clean_up_tokenization_spaces")
        return [self._decode(_to_list(s), skip_special_tokens, clean) for s in _to_list(sequences)]

    def _decode(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        # NOTE: transformers ignores the clean-up for BPE models (it corrupts their text).
        if clean_up and type(self._tokenizer.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return str(text)

    # ----- chat -----

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return str(templates[chat_template])
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return str(templates["tool_use"])
                if "default" in templates:
                    return str(templates["default"])
                raise ValueError(
                    "this model has several chat templates and none is the default: pass "
                    f"chat_template= (one of {sorted(templates)})"
                )
        elif chat_template is None:
            if templates is None:
                raise ValueError(
                    "the tokenizer has no chat template (tokenizer.chat_template is not set) and "
                    "no chat_template was passed"
                )
            return str(templates)
        return chat_template

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[Any] | None = None,
        documents: list[Any] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """transformers' `apply_chat_template`: the rendered text (`tokenize=False`), its ids
        (`return_dict=False`) or `{"input_ids", "attention_mask"}`. Padding, truncation, tensors,
        assistant masks, control-token sanitizing and callable tools go to transformers."""
        hf_only = {"return_tensors", "return_assistant_tokens_mask", "sanitize_control_tokens"}
        hf_only |= {"tokenizer_kwargs"}
        delegate = any(kwargs.get(k) for k in hf_only) or any(
            kwargs.get(k) not in (None, False) for k in ("padding", "truncation", "max_length")
        )
        if tools is not None and any(not isinstance(t, dict) for t in tools):
            delegate = True  # callables become JSON schemas through transformers' helper
        if delegate:
            return self.hf_tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                documents=documents,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=tokenize,
                return_dict=return_dict,
                **kwargs,
            )
        for key in ("padding", "truncation", "max_length"):
            kwargs.pop(key, None)
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("cannot apply a chat template to an empty conversation")
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        )
        conversations = conversation if batched else [conversation]
        conversations = [
            [{k: v for k, v in msg.items() if v is not None} for msg in getattr(c, "messages", c)]
            for c in conversations
        ]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        from pagedllm.transformers_utils.chat_template import render_chat  # imports jinja2

        variables = {**self.special_tokens_map, **kwargs}
        rendered = [
            render_chat(
                template,
                chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                variables=variables,
            )
            for chat in conversations
        ]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(rendered if batched else rendered[0], add_special_tokens=False)
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return (
            f"FastTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, special_tokens={self.special_tokens_map})"
        )


class Encoding(dict):  # type: ignore[type-arg]
    """A dict with attribute access (`enc.input_ids`), like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _to_list(value: Any) -> Any:
    """Token ids from lists, tuples, numpy arrays or tensors, as Python ints."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _clean_up_tokenization(text: str) -> str:
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


def _load_chat_template(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja, else tokenizer_config's `chat_template` (a string or named list)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, (list, tuple)):
        return {t["name"]: t["template"] for t in template}
    return template
