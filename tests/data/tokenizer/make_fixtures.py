"""Regenerate the tokenizer test fixtures in this folder (run by hand; the tests only read the outputs).

    python tests/data/tokenizer/make_fixtures.py            # corpus.json
    python tests/data/tokenizer/make_fixtures.py --js DIR   # + llama_tokenizer_js.json, DIR = unpacked npm package

corpus.json: a fixed multilingual / code / whitespace corpus: hand-written edge cases plus strings generated
from a seeded RNG (seed 20240423), so every reference sees the same inputs.

llama_tokenizer_js.json: the ids that llama-tokenizer-js 1.2.2 (npm, MIT, belladoreai; `npm pack
llama-tokenizer-js@1.2.2`) gives for each corpus string: `encode(text, add_bos_token=false,
add_preceding_space=true)`. Its 32000 pieces and merges are Llama-2's, the base of the Phi-3 tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240423

HANDWRITTEN = [
    "", " ", "  ", "   ", "\t", "\n", "\r\n", " \n ", "\n\n\n", "a", " a", "a ", "  a  ", "a\tb", "a\r\nb\r\n",
    "Hello world", " Hello world", "Hello  world", "Hello world ", "Hello\nworld", "Hello,\tworld!\n",
    "The quick brown fox jumps over the lazy dog.", "I can't believe it's not butter!",
    "def main():\n    print(\"hi\")\n    return 0\n", "for (int i = 0; i < n; ++i) { x[i] += 1; }",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)  # comment\n",
    "SELECT * FROM users WHERE id = 42;", "<div class=\"a\">Hi &amp; bye</div>", "{\"key\": [1, 2.5, null]}",
    "https://example.com/path?q=1&r=two#frag", "user@example.com", "C:\\Windows\\System32",
    "3.14159 2.71828 1e-9 0x1F 1,000,000", "1234567890", "9999999999999999999",
    "Äpfel über Öl", "naïve café résumé", "Ελληνικά κείμενα", "Привет, мир!", "нещо на Български",
    "日本語のテキストです。", "中文文本，测试。", "한국어 텍스트", "ภาษาไทย", "हिन्दी पाठ",
    "العربية من اليمين إلى اليسار", "עברית מימין לשמאל", "mixed עברית and English",
    "🦙🦙 llama", "emoji 😀😃😄 faces", "👩‍👩‍👧‍👦 family", "🇫🇷 flag", "a\u0301 e\u0300 combining",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̯͔̍", "\u200b zero width \u200d joiner", "\ufeffBOM", "tab\u00a0nbsp", "ideographic\u3000space",
    "\x00\x01\x02 control", "\x7f del", "\u2028line sep\u2029", "\U0001F600\U0001F4A9", "\U0010FFFF",
    "<|user|>", "<|end|>\n<|assistant|>", "<s>", "</s>", "<unk>", "<|endoftext|>", "< s >", "<0x0A>",
    "▁ lower-one-eighth", "ied 4 ½ months", "w048 7tuijk dsdfhu", "   Hello\n    Hello",
    "Hello!!! How are you???", "'''''''", "......", "------", "======", "______", "    ", "\t\t\t",
    "a" * 300, "ab" * 150, "🦙" * 20, "\n" * 20, " " * 33,
]

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n", ".,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`",
    "äöüßéèêàçñ", "абвгдежзийклмнопрстуфхцчшщъыьэюя", "αβγδεζηθικλμνξοπρστυφχψω", "日本語中文字漢字テストの",
    "한국어텍스트", "العربية", "עברית", "😀🦙👍🏽🎉", "\u0301\u0308\u200d",
]
WORDS = ("the of and to in is that for it as was with be by on not he I this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so what no out up into more do "
         "def return import class self None True False print range len lambda yield async await").split()


def generated(n: int = 1500) -> list[str]:
    rng = random.Random(SEED)
    out = []
    for k in range(n):
        if k % 3 == 0:  # word salad with varied whitespace
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
            seps = [rng.choice([" ", " ", " ", "  ", "\n", "\t", ", ", ". "]) for _ in words]
            out.append("".join(w + s for w, s in zip(words, seps)).rstrip(" ") if rng.random() < 0.5
                       else rng.choice(["", " ", "\n"]) + "".join(w + s for w, s in zip(words, seps)))
        else:  # random characters from one or two scripts
            chars = "".join(rng.sample(ALPHABETS, rng.randint(1, 2)))
            out.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 40))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--js", type=Path, help="unpacked llama-tokenizer-js package folder")
    args = ap.parse_args()
    corpus = HANDWRITTEN + generated()
    (HERE / "corpus.json").write_text(json.dumps(corpus, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    if args.js:
        script = (
            "import fs from 'fs';"
            f"const {{default: tok}} = await import({json.dumps(str(args.js.resolve() / 'llama-tokenizer.js'))});"
            f"const corpus = JSON.parse(fs.readFileSync({json.dumps(str(HERE / 'corpus.json'))}, 'utf8'));"
            "console.log(JSON.stringify(corpus.map(s => tok.encode(s, false, true))));"
        )
        ids = json.loads(subprocess.run(["node", "--input-type=module", "-e", script], check=True,
                                        capture_output=True, text=True).stdout)
        doc = {"package": "llama-tokenizer-js@1.2.2", "call": "encode(text, false, true)", "ids": ids}
        (HERE / "llama_tokenizer_js.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n",
                                                      encoding="utf-8")


if __name__ == "__main__":
    main()
