"""Read the text of a document, screenshot or receipt (OCR), streamed as Markdown.

On a Mac:  python examples/read_document.py --model Qwen/Qwen3.5-0.8B scan.png
Offline:   point --model at a local checkpoint directory (a multimodal one: with its vision tower).
Small print needs pixels: --max-pixels bounds the image's size after resizing (about 1024
pixels per prompt token; the checkpoint's default allows 16M).
"""

import argparse

from qwen35_mlx import load, stream_generate

PROMPT = (
    "Read all the text in this image, in reading order. Keep its structure: headings, "
    "lists and tables as Markdown. Do not describe the image."
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image")
parser.add_argument("--model", default="Qwen/Qwen3.5-0.8B")
parser.add_argument("--max-pixels", type=int, default=None)
parser.add_argument("--max-tokens", type=int, default=2048)
args = parser.parse_args()

options = {"max_pixels": args.max_pixels} if args.max_pixels else None
model, tokenizer = load(args.model, processor_options=options)
# greedy: transcription wants the most likely text, not variety
for response in stream_generate(
    model,
    tokenizer,
    PROMPT,
    images=[args.image],
    max_tokens=args.max_tokens,
    repetition_penalty=1.05,
):
    print(response.text, end="", flush=True)
print(
    f"\n({response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s, "
    f"finish: {response.finish_reason})"
)
