"""Tokenizers of a model directory with the special tokens of `tokenizer_config.json`.

Two engines behind one interface (`Tokenizer.from_dir`, encode/decode, the streaming
detokenizer, `eos_ids`, chat templates): sentencepiece (`tokenizer.model`, preferred when
present) and Hugging Face fast tokenizers (`tokenizer.json`, via the `tokenizers` library).
Both decode through the exact bytes of each token, so code round-trips (indentation, blank
lines, tabs, any unicode) and the streamer never splits a UTF-8 character: byte-fallback
pieces (`<0xAB>`) and byte-level pieces (GPT-2's byte-to-unicode alphabet) are bytes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re

import sentencepiece as spm

from .chat_template import TemplateLimitError, named_templates, render, template_for
from .errors import PLTError
from .files import check_regular_file, parse_json, read_json_object

CONFIG_FILE = "tokenizer_config.json"
MODEL_FILE = "tokenizer.model"
FAST_FILE = "tokenizer.json"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(PLTError, ValueError):
    pass


def check_text(text: str) -> None:
    """Text must be valid unicode: undecodable bytes of a command line or stdin arrive as lone
    surrogates (Python's surrogateescape), which no tokenizer can encode."""
    if not isinstance(text, str):
        raise TokenizerError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"the text is not valid UTF-8 (an undecodable byte at character "
                             f"{exc.start})") from None


def added_tokens(entries) -> dict[int, str]:
    """tokenizer_config.json's `added_tokens_decoder`: {"id": {"content": str, ...}} (or a
    bare string) -> {id: content}."""
    if not isinstance(entries, dict):
        raise TokenizerError(f"{CONFIG_FILE}: added_tokens_decoder must be an object, got "
                             f"{type(entries).__name__}")
    tokens = {}
    for key, entry in entries.items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not re.fullmatch(r"\d{1,9}", key) or not isinstance(content, str) or not content:
            raise TokenizerError(f"{CONFIG_FILE}: added_tokens_decoder entry {key!r} must map "
                                 f"an id to a non-empty content string, got {entry!r}")
        tokens[int(key)] = content
    return tokens


class Tokenizer:
    """The engine-independent part: added tokens, special ids, chat templates, decoding.

    An engine subclass provides `_encode_plain`, `_piece_bytes`, `_piece_id`,
    `_base_vocab_size` and the defaults of its special ids (`_default_ids`)."""

    def __init__(self, config: dict | None = None):
        config = config or {}
        self.config = config
        self.added_tokens = added_tokens(config.get("added_tokens_decoder", {}))
        self._added_ids = {content: i for i, content in self.added_tokens.items()}
        self._added_re = (re.compile("|".join(re.escape(t) for t in
                                              sorted(self._added_ids, key=len, reverse=True)))
                          if self._added_ids else None)
        defaults = self._default_ids()
        self.bos_id = self._token_id(config.get("bos_token"), defaults["bos"], "bos_token")
        self.pad_id = self._token_id(config.get("pad_token"), defaults["pad"], "pad_token")
        eos = config.get("eos_token")
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({i for i in (self._token_id(e, defaults["eos"], "eos_token")
                                           for e in eos) if i is not None})
        try:
            self.chat_templates = named_templates(config.get("chat_template"), CONFIG_FILE)
        except TemplateLimitError as exc:
            raise TokenizerError(str(exc)) from None
        # HF's `add_bos_token` (default true): whether prompts start with BOS by default.
        add_bos = config.get("add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{CONFIG_FILE}: add_bos_token must be true or false, got "
                                 f"{add_bos!r}")
        self.add_bos_token = add_bos and self.bos_id is not None

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of `model_dir`: tokenizer.model if present, else tokenizer.json."""
        model_dir = os.fspath(model_dir)
        config = {}
        config_path = os.path.join(model_dir, CONFIG_FILE)
        if os.path.exists(config_path):
            config = read_json_object(config_path, TokenizerError)
        sp_path, fast_path = (os.path.join(model_dir, name) for name in (MODEL_FILE, FAST_FILE))
        if not os.path.exists(sp_path) and os.path.exists(fast_path):
            return FastTokenizer(fast_path, config)
        return SentencePieceTokenizer(sp_path, config)

    def _token_id(self, token, default: int | None, field: str) -> int | None:
        """An id from the config entry `field`: an int, a token string, or {"content": ...}."""
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return default
        if isinstance(token, int) and not isinstance(token, bool):
            return token
        if not isinstance(token, str):
            raise TokenizerError(f"{CONFIG_FILE}: {field} must be a token string, an id or "
                                 f"{{\"content\": ...}}, got {token!r}")
        if token in self._added_ids:
            return self._added_ids[token]
        piece_id = self._piece_id(token)
        if piece_id is None:
            raise TokenizerError(f"{CONFIG_FILE}: special token {token!r} is not in the vocabulary")
        return piece_id

    @property
    def vocab_size(self) -> int:
        return max(self._base_vocab_size, max(self.added_tokens, default=-1) + 1)

    def check_fits(self, model_vocab_size: int) -> None:
        """Every id this tokenizer can produce must be a row of the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(f"the tokenizer has {self.vocab_size} tokens, more than the "
                                 f"model's vocab_size {model_vocab_size}: it belongs to another "
                                 f"model")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        check_text(text)
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        pos = 0
        for match in self._added_re.finditer(text) if self._added_re else ():
            ids += self._encode_plain(text[pos:match.start()])
            ids.append(self._added_ids[match.group()])
            pos = match.end()
        return ids + self._encode_plain(text[pos:])

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (control tokens and ids past the vocabulary,
        e.g. a model's padded rows: none)."""
        if token_id in self.added_tokens:
            return self.added_tokens[token_id].encode()
        if not 0 <= token_id < self._base_vocab_size:
            return b""
        return self._piece_bytes(token_id)

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    @property
    def chat_template(self) -> str | None:
        """The default chat template (HF's "default" of a list of named templates)."""
        return template_for(self.chat_templates, None)

    @chat_template.setter
    def chat_template(self, text: str | None) -> None:
        """Replace every template by `text` (serve's --chat-template)."""
        self.chat_templates = named_templates(text, "chat_template")

    @property
    def chat_template_has_tools(self) -> bool:
        """Whether the template reads the `tools` variable (renders tool definitions)."""
        text = template_for(self.chat_templates, tools=True)
        return bool(text) and re.search(r"\btools\b", text) is not None

    def special_token_strings(self) -> dict[str, str]:
        """bos_token, eos_token, ... as the template sees them (HF's special_tokens_map)."""
        strings = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = self.config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                strings[name] = token
        return strings

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **template_kwargs) -> str:
        """Render messages with the config's template (a Jinja2 string) as Hugging Face's
        `apply_chat_template(messages, tools=..., add_generation_prompt=True, **kwargs)`
        does: the same variables (messages, tools, add_generation_prompt, the special token
        strings, extra kwargs), filters and whitespace rules."""
        text = template_for(self.chat_templates, tools)
        if not text:
            raise TokenizerError("this tokenizer has no chat_template")
        import jinja2

        variables = {**self.special_token_strings(), **template_kwargs, "messages": messages,
                     "tools": tools, "add_generation_prompt": add_generation_prompt}
        try:
            return render(text, variables)
        except (jinja2.TemplateError, TemplateLimitError) as exc:
            raise TokenizerError(f"chat_template: {exc}") from None

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    **template_kwargs) -> list[int]:
        """Prompt ids of a chat: the rendered template, with bos first when the tokenizer
        adds one and the template did not write it already."""
        return self.encode_rendered_chat(self.apply_chat_template(messages, tools,
                                                                  **template_kwargs))

    def encode_rendered_chat(self, text: str) -> list[int]:
        """Prompt ids of a rendered chat (bos as `encode_chat` puts it)."""
        ids = self.encode(text, add_bos=False)
        if self.add_bos_token and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str, config: dict | None = None):
        if not os.path.exists(model_path):
            raise TokenizerError(f"{os.path.dirname(model_path) or '.'}: no {MODEL_FILE} "
                                 f"and no {FAST_FILE}")
        check_regular_file(model_path, TokenizerError)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{model_path}: not a sentencepiece model ({exc})") from None
        self._base_vocab_size = self.sp.get_piece_size()
        super().__init__(config)

    def _default_ids(self) -> dict:
        ids = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
        return {name: i if i >= 0 else None for name, i in ids.items()}

    def _piece_id(self, piece: str) -> int | None:
        piece_id = self.sp.piece_to_id(piece)
        if piece_id == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
            return None
        return piece_id

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def _piece_bytes(self, token_id: int) -> bytes:
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return b""
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def library_call(call, what: str):
    """`call()` of the tokenizers library, whose failures are bare Exceptions and, for a
    pattern its regex engine cannot run, a Rust panic (pyo3's PanicException, a BaseException
    that `except Exception` misses)."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: B036 (the panic; see above)
        raise TokenizerError(f"{what} ({type(exc).__name__}: {str(exc)[:200]})") from None


# how many times longer than its input a normalizer's output may be: an NFKC decomposition
# reaches 18 characters (U+FDFA), a lowercase 3, a byte-level alphabet 4 per character
NORMALIZER_GROWTH = {"NFC": 18, "NFD": 18, "NFKC": 18, "NFKD": 18, "Precompiled": 18,
                     "Lowercase": 3, "BertNormalizer": 3, "ByteLevel": 4, "Strip": 1,
                     "StripAccents": 1, "Nmt": 1}
MAX_NORMALIZER_GROWTH = 64


def normalizer_growth(normalizer) -> int:
    """A bound on the factor by which a tokenizer.json normalizer lengthens text."""
    if not isinstance(normalizer, dict):
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        return math.prod(normalizer_growth(n) for n in normalizer.get("normalizers") or ())
    if kind == "Prepend":
        return 1 + len(str(normalizer.get("prepend", "")))
    if kind == "Replace":
        pattern, content = normalizer.get("pattern"), str(normalizer.get("content", ""))
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        if isinstance(literal, str) and literal:
            return max(1, -(-len(content) // len(literal)))
        return len(content) + 1  # a regex may match the empty string, between each character
    return NORMALIZER_GROWTH.get(kind, 18)


def check_fast_spec(spec: dict, path: str) -> None:
    """What the tokenizers library accepts but would turn into garbage or a huge allocation:
    vocabulary entries that share an id (no round trip), a normalizer that multiplies text."""
    model = spec.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        seen = {}
        for token, token_id in vocab.items():
            if isinstance(token_id, int) and token_id in seen:
                raise TokenizerError(f"{path}: the vocabulary gives id {token_id!r} to both "
                                     f"{seen[token_id]!r} and {token!r}")
            seen[token_id] = token
    growth = normalizer_growth(spec.get("normalizer"))
    if growth > MAX_NORMALIZER_GROWTH:
        raise TokenizerError(f"{path}: the normalizer can make text {growth} times longer "
                             f"(at most {MAX_NORMALIZER_GROWTH} is accepted)")


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level pieces: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}
    return {char: byte for byte, char in chars.items()}


class FastTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`. Its own added tokens are matched by the library;
    those of tokenizer_config.json's `added_tokens_decoder` by the shared code above."""

    def __init__(self, path: str, config: dict | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        check_regular_file(path, TokenizerError)
        with open(path, "rb") as f:
            spec = parse_json(f.read(), path, TokenizerError)
        if not isinstance(spec, dict):
            raise TokenizerError(f"{path}: expected a JSON object")
        check_fast_spec(spec, path)
        self.path = path
        self.hf = library_call(lambda: HFTokenizer.from_str(json.dumps(spec)),
                               f"{path}: not a tokenizers file")
        self._base_vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        self.special_ids = {t["id"] for t in spec.get("added_tokens") or ()
                            if isinstance(t, dict) and t.get("special")}
        super().__init__(config)

    def _default_ids(self) -> dict:
        return {"bos": None, "eos": None, "pad": None}

    def _piece_id(self, piece: str) -> int | None:
        return self.hf.token_to_id(piece)

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        return library_call(lambda: self.hf.encode(text, add_special_tokens=False).ids,
                            f"{self.path}: encoding failed")

    def _piece_bytes(self, token_id: int) -> bytes:
        piece = self.hf.id_to_token(token_id)
        byte = BYTE_PIECE.fullmatch(piece or "")
        if byte:  # checked first: some files list the byte pieces as special added tokens
            return bytes([int(byte.group(1), 16)])
        if piece is None or token_id in self.special_ids:
            return b""
        if self.byte_level:
            alphabet = byte_level_alphabet()
            return b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode() for c in piece)
        return piece.replace("\u2581", " ").encode()


class StreamingDetokenizer:
    """Turns a stream of token ids into text deltas that are always whole UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._pending = b""

    def add(self, token_id: int) -> str:
        self._pending += self.tokenizer.token_bytes(int(token_id))
        text, self._pending = _split_complete_utf8(self._pending)
        return text

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text


def _split_complete_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    cut = len(data)
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            if need > back:
                cut = len(data) - back
            break
    return data[:cut].decode("utf-8", errors="replace"), data[cut:]


def train_tokenizer(text_files: list[str], out_dir: str, vocab_size: int,
                    special_tokens: dict | None = None) -> None:
    """Train a code-faithful BPE model into `out_dir` (tokenizer.model + tokenizer_config.json)."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    try:
        _train_sentencepiece(text_files, prefix, vocab_size)
    except RuntimeError as exc:  # e.g. a vocab size the corpus cannot support
        raise TokenizerError(f"tokenizer training with vocab_size={vocab_size} failed: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
    os.remove(prefix + ".vocab")
    strip_machine_paths(prefix + ".model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "model_max_length": None}
    config.update(special_tokens or {})
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def strip_machine_paths(model_path: str) -> None:
    """Rewrite a sentencepiece model without the paths of the machine that trained it: its
    trainer spec lists the corpus files by absolute path and the output prefix (a temp
    folder). The corpus is kept, relative to its root; pieces and scores are untouched."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.trainer_spec
    inputs = list(spec.input)
    if inputs:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in inputs])
        del spec.input[:]
        spec.input.extend(os.path.relpath(os.path.abspath(p), root) for p in inputs)
    spec.model_prefix = os.path.basename(spec.model_prefix)
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())


def _train_sentencepiece(text_files: list[str], prefix: str, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        input=text_files, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "\t"],
        add_dummy_prefix=False, max_sentence_length=1 << 16, split_by_whitespace=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, num_threads=2,
        train_extremely_large_corpus=False,
    )
