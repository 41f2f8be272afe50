"""Tokenizer loading (tokenizer.json, tokenizer.model, GGUF metadata), special-token safety, streaming decode.

Two codecs do the work: sentencepiece for a Gemma 3 GGUF vocabulary (`PieceCodec`: the model's own kind of
tokenizer, a quarter of the memory) and the `tokenizers` library for the rest (`LibraryCodec`: tokenizer.json,
tokenizer.model, Gemma 4's stored merges); both give the reference's ids. Plain text never yields control tokens,
and the media markers are made special too (the reference leaves `<start_of_image>` matchable from text). Only
templates produce control tokens: user text inside a rendered template is escaped (`escape`) so that a
spelled-out `<start_of_turn>` in it stays plain text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from .errors import InputError, TokenizerError
from .files import model_file

MEDIA_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
CONTROL, USER_DEFINED = 3, 4  # token types shared by GGUF and sentencepiece
ESC = "\ue000"  # private-use escape mark, inserted in user text after each character that may begin a special
_UNESCAPE = re.compile(ESC + "(" + ESC + "?)")


def cache_dir() -> Path:
    return Path(os.environ.get("GEMRUN_CACHE", Path.home() / ".cache" / "gemrun"))


def check_text(text: str) -> str:
    """Refuse text that is not valid Unicode (lone surrogates cannot be encoded as UTF-8)."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"text is not valid UTF-8 (character {e.start}: lone surrogate)") from None
    return text


def derive_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary ranked by file order (Gemma GGUFs store no merges).

    Every split of a token into two known tokens is a merge ranked by the token's position; ties prefer the
    longer left part. This is the order transformers derives (`generate_merges` with scores = -index), which
    tries every split and so costs the square of a token's length; here the splits come from the lengths of the
    token's known prefixes and suffixes (`_affix_lengths`), in time linear in the vocabulary's characters.
    """
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token ranks at its last position, as there
    prefixes = _affix_lengths(vocab)
    suffixes = _affix_lengths([t[::-1] for t in vocab])
    merges = []
    for token in sorted(vocab, key=vocab.__getitem__):
        n, left, right = len(token), prefixes[token], suffixes[token[::-1]]
        while left:
            k = left.bit_length() - 1  # the longest known prefix first
            left ^= 1 << k
            if 0 < k and right >> (n - k) & 1:
                merges.append((token[:k], token[k:]))
    return merges


def _affix_lengths(words) -> dict[str, int]:
    """For each word, a bit mask of the lengths of the other words that are its prefixes. In sorted order a
    word's prefixes come before it and every word between a prefix and the word shares that prefix, so a stack
    of the current chain of prefixes finds them all, each word pushed and popped once."""
    out: dict[str, int] = {}
    chain: list[tuple[str, int]] = []  # (word, mask of its own known prefixes and itself)
    for w in sorted(words):
        while chain and not w.startswith(chain[-1][0]):
            chain.pop()
        mask = chain[-1][1] if chain else 0
        out[w] = mask
        chain.append((w, mask | 1 << len(w)))
    return out


def parse_merges(merges: list[str]) -> list[tuple[str, str]]:
    """GGUF `tokenizer.ggml.merges` ("left right", split at the first space after the first character, as
    llama.cpp's vocabulary loader does) -> pairs."""
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"GGUF tokenizer merge {m[:40]!r} has no space between its two parts")
        pairs.append((m[:cut], m[cut + 1:]))
    return pairs


def build_backend(tokens: list[str], types: Iterable[int], unk: str = "<unk>",
                  merges: list[tuple[str, str]] | None = None) -> Backend:
    """A sentencepiece-style BPE (byte fallback, spaces as '▁', no dummy prefix) from a token list and types;
    the merges are given (ranked by their order) or derived from the vocabulary (`derive_merges`)."""
    # Whitespace-only tokens are stored as real spaces; the BPE sees '▁'.
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    types = list(types)
    if merges is not None:
        known = set(tokens)
        bad = next((p for p in merges if p[0] not in known or p[1] not in known or p[0] + p[1] not in known), None)
        if bad is not None:
            raise TokenizerError(f"tokenizer merge {' '.join(bad)[:60]!r} joins pieces outside the vocabulary")
    try:
        model = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=derive_merges(tokens) if merges is None
                    else merges, fuse_unk=True, unk_token=unk, byte_fallback=True, dropout=None)
    except Exception as e:  # the library raises its own exception type  # noqa: BLE001
        raise TokenizerError(f"tokenizer vocabulary cannot be built: {e}") from None
    backend = Backend(model)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED and t not in MEDIA_TOKENS])
    return backend


def longest_piece(pieces: Iterable[str]) -> int:
    """UTF-8 bytes of the longest of `pieces` as text ('▁' is a space); at least 1."""
    return max((len(p.replace("\u2581", " ").encode()) for p in pieces), default=1) or 1


class LibraryCodec:
    """Text <-> ids by the `tokenizers` library (tokenizer.json, tokenizer.model, Gemma 4's stored merges)."""

    def __init__(self, backend: Backend):
        present = [AddedToken(t, special=True, normalized=False) for t in MEDIA_TOKENS
                   if backend.token_to_id(t) is not None]
        backend.add_special_tokens(present)
        backend.encode_special_tokens = True
        self.backend = backend

    def library(self) -> Backend:
        return self.backend

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def specials(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def pieces(self) -> Iterable[tuple[str, int]]:
        return self.backend.get_vocab(with_added_tokens=True).items()


class PieceCodec:
    """Text <-> ids by sentencepiece, for a Gemma 3 vocabulary without stored merges (GGUF pieces and types): the
    tokenizer kind the model was trained with, built in memory in ~0.2 s and holding ~25 MB, where the same
    vocabulary as a `tokenizers` BPE with derived merges holds ~95 MB. It gives the ids the reference does: piece
    scores rank merges by id (as `derive_merges`); whitespace-run pieces are ordinary pieces (the reference never
    matches them as added tokens: runs of spaces merge pairwise); media markers are control pieces (never from
    text). Control and unknown pieces are spelled out here on decode (sentencepiece drops them). `library` builds
    the equivalent `tokenizers` BPE when something needs that object (conversion, a written tokenizer.json)."""

    def __init__(self, tokens: list[str], types: list[int], unk_id: int):
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = sp_pb2.ModelProto()
        spec = proto.trainer_spec
        spec.model_type, spec.vocab_size, spec.byte_fallback = sp_pb2.TrainerSpec.BPE, len(tokens), True
        spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk_id, -1, -1, -1
        norm = proto.normalizer_spec
        norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = (
            "identity", False, False, True)
        self.spelled: dict[int, str] = {}  # control (and unknown) pieces: what decode shows unless skipping
        self.special: set[int] = set()
        self.runs: dict[int, int] = {}  # length -> id of the whitespace-run pieces the file marks user-defined
        for i, (t, ty) in enumerate(zip(tokens, types)):
            p = proto.pieces.add()
            space = " " in t and not t.strip()
            if space and ty == USER_DEFINED:
                self.runs[len(t)] = i
            p.piece = "\u2581" * len(t) if space else t
            if i == unk_id:
                p.type = 2  # UNKNOWN
            elif ty == CONTROL or t in MEDIA_TOKENS:
                p.type = CONTROL
            elif ty == USER_DEFINED and not space or ty == 6:  # BYTE
                p.type = ty
            else:
                p.type, p.score = 1, -float(i)  # NORMAL (also UNUSED ones: the reference decodes them as text)
            if p.type in (2, CONTROL):
                self.spelled[i] = t
                if p.type == CONTROL or ty == CONTROL:
                    self.special.add(i)
        self.sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.n = self.sp.get_piece_size()  # asked on every decode: the library call is not free
        self.types, self.unk_id = bytes(types), unk_id  # the file's types (the pieces are the sentencepiece's)
        self._library: Backend | None = None

    def library(self) -> Backend:
        if self._library is None:
            tokens = [self.sp.id_to_piece(i) for i in range(self.size())]
            self._library = _library_backend(tokens, list(self.types), self.unk_id, None)
        return self._library

    def encode(self, text: str) -> list[int]:
        if not self.runs or "\u2581" not in text:
            return self.sp.encode(text) if text else []
        # The reference matches its whitespace-run tokens (spelled with '▁') in the text as written, longest
        # first, before spaces become '▁': a literal run of '▁' is cut into those tokens, the text around it
        # tokenized apart.
        ids, start, lengths = [], 0, sorted(self.runs, reverse=True)
        for m in re.finditer("\u2581+", text):
            at = m.start()
            while (k := next((n for n in lengths if n <= m.end() - at), 0)):
                ids += self.sp.encode(text[start:at]) if at > start else []
                ids.append(self.runs[k])
                at = start = at + k
        return ids + (self.sp.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids: list[int], skip_special: bool) -> str:
        out, run, n = [], [], self.n
        for i in ids:
            if not 0 <= i < n:
                continue  # as the library: an id outside the vocabulary decodes to nothing
            if i in self.spelled:
                out.append(self.sp.decode(run))
                run = []
                if not (skip_special and i in self.special):
                    out.append(self.spelled[i])
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # the unknown id for a piece not in the vocabulary
        return i if self.id_to_token(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        return self.spelled.get(i) or self.sp.id_to_piece(i) if 0 <= i < self.n else None

    def size(self) -> int:
        return self.n

    def specials(self) -> dict[str, int]:
        return {self.spelled[i]: i for i in self.special}

    def pieces(self) -> Iterable[tuple[str, int]]:
        return ((self.id_to_token(i), i) for i in range(self.size()))


class PieceCache:
    """Ids of the text pieces between a template's control tokens, least recently used first out, bounded by the
    characters it holds. A conversation's prompt repeats every earlier turn's pieces; tokenizing only the new ones
    keeps its assembly from growing with the conversation (10 Gemma 4 turns, ~2,900 tokens: 7 -> <1 ms)."""

    def __init__(self, max_chars: int = 2 << 20):
        self.max_chars, self.chars = max_chars, 0
        self.entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, text: str) -> tuple[int, ...] | None:
        with self.lock:
            ids = self.entries.get(text)
            if ids is not None:
                self.entries.move_to_end(text)
            return ids

    def put(self, text: str, ids: tuple[int, ...]) -> None:
        if len(text) > self.max_chars // 4:
            return
        with self.lock:
            if text not in self.entries:
                self.entries[text] = ids
                self.chars += len(text)
            while self.chars > self.max_chars:
                self.chars -= len(self.entries.popitem(last=False)[0])


class Tokenizer:
    def __init__(self, codec: LibraryCodec | PieceCodec, bos_id: int = 2, eos_id: int = 1, pad_id: int = 0,
                 add_bos: bool = True, chat_template: str | None = None, max_token_bytes: int | None = None):
        self.codec = codec
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.chat_template = chat_template
        self.specials = codec.specials()
        self._lengths = sorted({len(s) for s in self.specials}, reverse=True)  # of the control tokens' spellings
        starts = sorted({s[0] for s in self.specials})  # "<" for every Gemma control token
        self._starts = re.compile("[" + "".join(re.escape(c) for c in starts) + "]") if starts else None
        # at load, not inside the first long request (deriving it scans the vocabulary: ~0.5 s at 262K tokens)
        self.max_token_bytes = max_token_bytes or self.longest_piece_bytes()
        self.vocab_size = codec.size()
        self.pieces_seen = PieceCache()

    @property
    def backend(self) -> Backend:
        """The vocabulary as a `tokenizers` object (what a written tokenizer.json holds)."""
        return self.codec.library()

    def longest_piece_bytes(self) -> int:
        """UTF-8 bytes of the longest piece plain text can become (`max_token_bytes`): text of n bytes is at least
        n / max_token_bytes tokens (special tokens never come from text)."""
        return longest_piece(p for p, i in self.codec.pieces() if p not in self.specials)

    def pieces(self) -> list[str]:
        """Every piece by id ('' for an id the vocabulary leaves unused)."""
        out = [""] * self.vocab_size
        for piece, i in self.codec.pieces():
            out[i] = piece
        return out

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Plain text to ids; control-token spellings in it stay text."""
        ids = self.codec.encode(check_text(text))
        return [self.bos_id, *ids] if bos else ids

    def escape(self, text: str) -> str:
        """Make user text inert inside a rendered template (undone by encode_template): every character that can
        begin a control token's spelling is followed by an escape mark, so no control token can form in user text,
        nor across pieces of it that a template joins (a part ending in `<start_of` and the next one beginning
        with `_image>`)."""
        text = check_text(text).replace(ESC, ESC + ESC)
        return self._starts.sub(lambda m: m.group(0) + ESC, text) if self._starts else text

    def encode_template(self, rendered: str) -> list[int]:
        """A rendered template to ids: its own special spellings become control tokens, escaped user text
        is plain. The text between specials is tokenized piecewise, as the reference does around added tokens."""
        ids: list[int] = []
        pos = 0
        for start, end in self.special_spans(rendered):
            ids += self._plain(rendered[pos:start])
            ids.append(self.specials[rendered[start:end]])
            pos = end
        return ids + self._plain(rendered[pos:])

    def special_spans(self, text: str) -> Iterator[tuple[int, int]]:
        """(start, end) of each control token's spelling in `text`, left to right, the longest where several
        begin at one place: what a regex alternation of every spelling finds, but asked only where a spelling can
        begin and only for the lengths spellings have (Gemma's 6,000+ spellings in one alternation took ~0.45 ms
        on a 10-turn prompt)."""
        at = self._starts.search(text) if self._starts else None
        while at is not None:
            i = at.start()
            end = next((i + n for n in self._lengths if i + n <= len(text) and text[i:i + n] in self.specials), None)
            if end is not None:
                yield i, end
            at = self._starts.search(text, end or i + 1)

    def _plain(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.pieces_seen.get(text)
        if ids is None:
            ids = tuple(self.codec.encode(_UNESCAPE.sub(r"\1", text)))
            self.pieces_seen.put(text, ids)
        return list(ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.codec.decode(list(ids), skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.codec.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.codec.id_to_token(i)

    def stream(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Incremental detokenization that never emits a broken UTF-8 character: text is released only once the
    bytes of a character split across byte-fallback tokens are complete."""

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self.tok, self.skip = tok, skip_special
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character decodes to U+FFFD, as the full decode would)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def from_gguf_metadata(meta: dict, image_token: bool = False, model: str = "llama") -> Tokenizer:
    """Build the tokenizer a GGUF describes (tokens, types, special ids, merges when it stores them): sentencepiece
    for pieces without merges (`PieceCodec`), else the library's BPE (cached on disk, `_library_backend`). `model` is
    the `tokenizer.ggml.model` expected (Gemma 3: "llama", sentencepiece pieces). `image_token` appends
    `<image_soft_token>` (not in GGUF vocabularies) after the last id, as HF's has it. The loader
    has checked the metadata's types (`weights.gguf.check_tokenizer_metadata`)."""
    found = meta.get("tokenizer.ggml.model")
    if found != model:
        raise TokenizerError(f"GGUF tokenizer model {str(found)[:40]!r} is not supported here (expected {model!r})")
    tokens = meta["tokenizer.ggml.tokens"]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
        raise TokenizerError("GGUF tokenizer.ggml.merges must be an array of strings")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 3)
    extra = ["<image_soft_token>"] if image_token and "<image_soft_token>" not in tokens else []
    tokens, types = tokens + extra, types + [CONTROL] * len(extra)
    codec = None
    if merges is None and 0 <= unk_id < len(tokens):
        try:
            codec = PieceCodec(tokens, types, unk_id)
        except RuntimeError:  # a vocabulary sentencepiece refuses (it validates pieces and ids) takes the library
            codec = None
    codec = codec or LibraryCodec(_library_backend(tokens, types, unk_id, merges))
    return Tokenizer(codec, bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
                     eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
                     pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                     chat_template=meta.get("tokenizer.chat_template"),
                     max_token_bytes=longest_piece(tokens))


def _library_backend(tokens: list[str], types: list[int], unk_id: int, merges: list[str] | None) -> Backend:
    """The vocabulary as a `tokenizers` BPE, cached on disk: deriving the merges of a 262k vocabulary takes
    seconds, loading the cached tokenizer.json much less."""
    stored = [tokens, types] + ([merges] if merges is not None else [])  # files without merges keep their keys
    key = hashlib.sha256(json.dumps(stored).encode()).hexdigest()[:24]
    cached = cache_dir() / "tokenizers" / f"{key}.json"
    if cached.is_file():
        try:
            return Backend.from_file(str(cached))
        except Exception:  # a damaged cache file is rebuilt  # noqa: BLE001
            pass
    unk = tokens[unk_id] if 0 <= unk_id < len(tokens) else "<unk>"
    backend = build_backend(tokens, types, unk, None if merges is None else parse_merges(merges))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        tmp.replace(cached)
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return backend


def from_sentencepiece(path: Path) -> Backend:
    """A `tokenizer.model` (sentencepiece protobuf) as the same BPE backend."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # parsing only: no pickle, no code

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError on garbage  # noqa: BLE001
        raise TokenizerError(f"{path} is not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{path} has no pieces")
    pieces = [p.piece for p in proto.pieces]
    unk = next((p.piece for p in proto.pieces if p.type == 2), "<unk>")  # UNKNOWN
    return build_backend(pieces, [p.type for p in proto.pieces], unk)


def from_directory(root: Path) -> Tokenizer:
    """tokenizer.json (preferred) or tokenizer.model, with tokenizer_config.json / chat_template.jinja; each a
    regular file inside `root` (`files.model_file`)."""
    def find(name: str) -> Path | None:
        return model_file(root, name, TokenizerError)

    cfg: dict = {}
    if cfg_path := find("tokenizer_config.json"):
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise TokenizerError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path} is not a JSON object")
    if json_path := find("tokenizer.json"):
        try:
            backend = Backend.from_file(str(json_path))
        except Exception as e:  # the library raises its own exception type  # noqa: BLE001
            raise TokenizerError(f"{json_path} cannot be loaded: {e}") from None
    elif sp_path := find("tokenizer.model"):
        backend = from_sentencepiece(sp_path)
    else:
        raise TokenizerError(f"{root} has neither tokenizer.json nor tokenizer.model")
    template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
    if template_path := find("chat_template.jinja"):
        try:
            template = template_path.read_text()
        except ValueError:
            raise TokenizerError(f"{template_path} is not UTF-8 text") from None

    def tid(name: str, default: int) -> int:
        tok = cfg.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        found = backend.token_to_id(tok) if isinstance(tok, str) else None
        return default if found is None else found

    return Tokenizer(LibraryCodec(backend), bos_id=tid("bos_token", 2), eos_id=tid("eos_token", 1),
                     pad_id=tid("pad_token", 0), add_bos=bool(cfg.get("add_bos_token", True)), chat_template=template)
